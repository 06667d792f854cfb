"""LocalVim and LocalVMamba (search and derived forms), SCAttn, the registry and checkpoint helpers.

    model = create_model("local_vim_demo_search")        # supernet: 8 directions per layer
    alphas = arch_parameters(model)                       # one (8, 1, 1, 1) alpha per layer
    arch = derive_directions(model, k=4)                  # per-layer top-4, in DIRECTIONS order
    final = create_model("local_vim_demo", directions=arch)
"""
from nas.models import local_vim, local_vmamba  # noqa: F401  (register the variants)
from nas.models.arch import check_candidates, check_directions, published_directions
from nas.models.backbone import FPNHead, load_backbone_checkpoint
from nas.models.checkpoint import derived_from_supernet, load_checkpoint, read_state_dict
from nas.models.export_onnx import export_onnx, onnx_logits
from nas.models.flops import count_parameters, flops
from nas.models.local_vim import LocalVim
from nas.models.local_vmamba import LocalVMamba
from nas.models.registry import create_model, is_search_model, list_models
from nas.models.scattn import SCAttn
from nas.models.search_space import (alpha_state_keys, arch_parameters, derive_directions, search_candidates,
                                     search_scans, set_active_paths, set_batched, split_parameters)

__all__ = ["create_model", "list_models", "is_search_model", "arch_parameters", "search_scans", "search_candidates",
           "alpha_state_keys",
           "derive_directions", "split_parameters", "set_batched", "set_active_paths", "load_checkpoint",
           "read_state_dict", "derived_from_supernet", "flops", "count_parameters", "published_directions",
           "check_directions", "check_candidates", "LocalVim", "LocalVMamba", "SCAttn", "load_backbone_checkpoint",
           "FPNHead", "export_onnx", "onnx_logits"]
