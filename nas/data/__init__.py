"""Data: ImageFolder / file-list datasets, ImageNet subsets, transforms, the built-in demo digits, loaders.

Entry points: ``build_datasets(data_cfg, img_size, seed, run_dir)`` -> ``DataBundle`` (``data_cfg`` keys
in ``nas.data.build``), ``build_loader(dataset, batch_size, train, workers, seed, distributed)`` and
``set_epoch(loader, epoch)``. Bad data raises ``DataError`` (a ``nas.errors.UserError``) with a one-line message.
"""
from nas.data.build import DATA_DEFAULTS, FILE_LISTS, DataBundle, build_datasets, resolve_data_config
from nas.data.datasets import ImageFileDataset, TensorImageDataset, load_rgb
from nas.data.errors import DataError
from nas.data.folder import IMAGE_EXTENSIONS
from nas.data.loader import build_loader, seed_worker, set_epoch
from nas.data.samples import SampleList, read_class_list, read_file_list, write_file_list
from nas.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = ["DATA_DEFAULTS", "FILE_LISTS", "DataBundle", "build_datasets", "resolve_data_config", "ImageFileDataset",
           "TensorImageDataset", "load_rgb", "DataError", "IMAGE_EXTENSIONS", "build_loader",
           "seed_worker", "set_epoch", "SampleList", "read_class_list", "read_file_list", "write_file_list",
           "IMAGENET_MEAN", "IMAGENET_STD", "build_transform"]
