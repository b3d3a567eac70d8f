"""Pixel pipelines per task: MAE, CLIP and classification training augmentations, evaluation resize and crop."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TASKS = ("mae", "clip", "classify", "eval")
LABELLED_TASKS = ("classify", "eval")


def image_transform(
    task: str,
    image_size: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    augment: Mapping[str, Any] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor ``[3, image_size, image_size]``.

    ``mae``: RandomResizedCrop(scale 0.2-1, bicubic) and horizontal flip (the MAE recipe); ``clip``:
    RandomResizedCrop(scale 0.9-1, bicubic) (open_clip's training transform); ``classify``: timm's training
    transform (``timm.data.create_transform(is_training=True)``, bicubic) with ``augment`` as its keyword
    arguments, e.g. ``auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25`` (MAE's fine-tuning recipe);
    ``eval``: bicubic resize of the short side to ``floor(image_size / crop_pct)`` and a center crop (timm's
    evaluation transform).
    """
    if augment is not None and task != "classify":
        raise ValueError(f"augment options apply to task 'classify', not {task!r}")
    bicubic = v2.InterpolationMode.BICUBIC
    if task == "classify":
        return create_transform(image_size, is_training=True, interpolation="bicubic", mean=tuple(mean),
                                std=tuple(std), **(augment or {}))
    if task == "mae":
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
            v2.RandomHorizontalFlip(),
        ]
    elif task == "clip":
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    elif task == "eval":
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        geometry = [v2.Resize(math.floor(image_size / crop_pct), interpolation=bicubic), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
