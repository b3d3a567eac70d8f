"""Pretraining data layer: WebDataset shard writer, demo data and a resumable streaming loader.

Write shards with ``python -m pretrain.data {folder,captions,demo} ...`` or :func:`write_shards`; read them
with :func:`build_loader`. See ``docs/data.md``.
"""

from .demo import resolve_demo_source, write_demo
from .loader import ShardLoader, build_loader
from .shards import expand_shards, read_dataset_info, shard_sizes
from .sources import Source, caption_file_source, image_folder_source, template_captions
from .stream import BadDataError, BadSample
from .transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceNormalize, image_transform
from .writer import ArrayImage, FileImage, ShardSample, WriteSummary, write_shards

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayImage",
    "BadDataError",
    "BadSample",
    "DeviceNormalize",
    "FileImage",
    "ShardLoader",
    "ShardSample",
    "Source",
    "WriteSummary",
    "build_loader",
    "caption_file_source",
    "expand_shards",
    "image_folder_source",
    "image_transform",
    "read_dataset_info",
    "resolve_demo_source",
    "shard_sizes",
    "template_captions",
    "write_demo",
    "write_shards",
]
