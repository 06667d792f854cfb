"""What a model's constructor arguments may hold, checked in one place before anything is built.

``check_model_args(spec, args)`` (``create_model`` calls it; a search checks its ``model_args`` with it before
any data is read) raises a one-line ``UserError`` for an option the family does not have, a value of the wrong
type or out of range, a combination the family cannot build, and an image size whose activations cannot fit in
this machine's memory (``activation_bytes``: a lower bound, so a size that could fit is never refused).
"""
from __future__ import annotations

import inspect
import os

import torch

from nas.config import BOOLEAN, Check, choice, integer, number
from nas.errors import UserError
from nas.models.scattn import SCATTN_MODES
from nas.ops import BACKENDS, DIRECTIONS

SCATTN_MIN_CHANNELS = 8  # SCAttn reduces the channels by 8 (nas.models.scattn): fewer leave it none
BYTES_PER_VALUE = 2  # bf16: the smallest a saved activation can be, so the estimate stays a lower bound


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_list(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive, v))


CHECKS = {
    "img_size": Check("an int >= 1 or [height, width], ints >= 1",
                      lambda v: _positive(v) or (_positive_list(v) and len(v) == 2)),
    "patch_size": integer(1),
    "in_chans": integer(1),
    "embed_dim": integer(1),
    "depth": integer(1),
    "d_state": integer(1),
    "expand": integer(1),
    "num_classes": integer(0),
    "drop_path_rate": number(0, 1, high_open=True),
    "scans_per_layer": Check("an int >= 1 or one such int per layer", lambda v: _positive(v) or _positive_list(v)),
    "mid_cls_token": BOOLEAN,
    "rope": BOOLEAN,
    "pt_seq_len": number(0, low_open=True),
    "scattn": choice(*SCATTN_MODES),
    "backend": choice(*BACKENDS),
    "dims": Check("a list of ints >= 1 (one width per stage)", _positive_list),
    "depths": Check("a list of ints >= 1 (one depth per stage)", _positive_list),
    "ssm_ratio": number(0, low_open=True),
}
NOT_CHECKED_HERE = ("directions", "candidates")  # the arch checks (nas.models.arch) own these


def resolved_config(spec, args: dict) -> dict:
    """The constructor's defaults, then the variant's, then ``args``."""
    params = inspect.signature(spec.cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **spec.defaults, **args}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """(tokens, scanned channels) of every layer of the model ``config`` describes."""
    (h, w), p = _pair(config["img_size"]), config["patch_size"]
    if "depth" in config:  # LocalVim: images padded to the patch, one grid for every layer
        return [(_ceil(h, p) * _ceil(w, p), config["expand"] * config["embed_dim"])] * config["depth"]
    h, w, shapes = h // p, w // p, []  # LocalVMamba: an unpadded patch conv, then each merge halves (rounding up)
    for dim, depth in zip(config["dims"], config["depths"]):
        shapes += [(h * w, int(config["ssm_ratio"] * dim))] * depth
        h, w = _ceil(h, 2), _ceil(w, 2)
    return shapes


def activation_bytes(config: dict, search: bool, batch: int = 1, directions: int | None = None) -> int:
    """A lower bound of the activations one training step of ``batch`` images keeps for the backward: in every
    layer, two tensors per direction of its scanned channels (LocalVim: the scan's input and gate; LocalVMamba:
    its step sizes and output), ``BYTES_PER_VALUE`` each. directions: the fewest a layer runs in a step (a
    sampled search's k); None: every candidate (search) or scans_per_layer (derived)."""
    counts = config["scans_per_layer"]
    if directions is None:
        directions = len(config["candidates"] or DIRECTIONS) if search else min(counts) \
            if isinstance(counts, (list, tuple)) else counts
    return sum(batch * tokens * directions * 2 * channels * BYTES_PER_VALUE
               for tokens, channels in layer_shapes(config))


def machine_memory(device: str = "cpu") -> tuple[int, str] | None:
    """(bytes, who has them) of the memory a model on ``device`` ("cpu", "auto", "cuda[:N]") trains in: the
    machine's RAM, or the GPU's; None where the system does not say."""
    if device.startswith("cuda") or device == "auto" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index} has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (AttributeError, ValueError, OSError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_model_args(spec, args: dict, prefix: str = "", set_elsewhere: dict | None = None, given: dict | None = None,
                     batch: int = 1, directions: int | None = None, device: str = "cpu") -> dict:
    """Check ``args`` (overrides of the registered variant ``spec``): each option, then what they must satisfy
    together, then that the activations of a training step of ``batch`` images (``directions`` per layer) fit in
    the memory of ``device`` (``activation_bytes``). Returns the model's whole config.

    prefix: how the caller names the options ("model_args."); set_elsewhere: options the caller sets itself,
    each with the sentence that tells the user where to set it; given: the values of those (checked by the
    caller, named without the prefix)."""
    set_elsewhere, given = set_elsewhere or {}, given or {}
    allowed = [k for k in spec.cls.CONFIG_KEYS
               if k != "directions" and k not in set_elsewhere and not (spec.search and k == "scans_per_layer")]
    for key, value in args.items():
        if key in set_elsewhere:
            raise UserError(f"{prefix}{key}: {set_elsewhere[key]}")
        if spec.search and key == "scans_per_layer":
            raise UserError(f"{prefix}{key}: {spec.name} is a search model, which runs all its candidates in every "
                            f"layer; scans_per_layer is the number of directions of a derived model (a search "
                            f"chooses how many to keep with strategy.k)")
        if key not in allowed:
            raise UserError(f"{prefix}{key}: not an option of {spec.name}; expected one of {', '.join(allowed)}")
        check = CHECKS.get(key)
        if check is not None and not check.ok(value):
            raise UserError(f"{prefix}{key}: expected {check.expected}, got {value!r}")
    config = resolved_config(spec, {**args, **given})

    def name(key: str) -> str:
        return key if key in given else prefix + key

    if "depth" in config:
        widths = [(name("expand"), config["expand"] * config["embed_dim"],
                   f"embed_dim {config['embed_dim']} x expand {config['expand']}")]
    else:
        if len(config["dims"]) != len(config["depths"]):
            raise UserError(f"{name('dims')}: expected one width per stage ({len(config['depths'])} stages), "
                            f"got {config['dims']}")
        widths = [(name("ssm_ratio"), int(config["ssm_ratio"] * d), f"ssm_ratio {config['ssm_ratio']} x dims {d}")
                  for d in config["dims"]]
        if min(_pair(config["img_size"])) < config["patch_size"]:
            raise UserError(f"{name('img_size')}: expected at least the patch size of {spec.name} "
                            f"({config['patch_size']}), got {config['img_size']}")
    for key, n, how in widths:
        if n < SCATTN_MIN_CHANNELS:
            raise UserError(f"{key}: {how} makes {n} scanned channels; SCAttn needs at least {SCATTN_MIN_CHANNELS}")
    memory, need = machine_memory(device), activation_bytes(config, spec.search, batch, directions)
    if memory is not None and need > memory[0]:
        (h, w), tokens = _pair(config["img_size"]), layer_shapes(config)[0][0]
        raise UserError(f"{name('img_size')}: {h} x {w} images make {tokens:,} tokens per layer of {spec.name}, "
                        f"whose activations for one training step of {batch} image{'s' if batch > 1 else ''} "
                        f"need at least {_gb(need)}; {memory[1]} {_gb(memory[0])}; expected a smaller img_size"
                        f"{' or batch size' if batch > 1 else ''}")
    return config
