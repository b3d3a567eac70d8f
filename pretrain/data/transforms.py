"""Pixel pipelines per task: MAE and CLIP training augmentations, evaluation resize and center crop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TASKS = ("mae", "clip", "eval")


def image_transform(
    task: str,
    image_size: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor ``[3, image_size, image_size]``.

    ``mae``: RandomResizedCrop(scale 0.2-1, bicubic) and horizontal flip (the MAE recipe); ``clip``:
    RandomResizedCrop(scale 0.9-1, bicubic) (open_clip's training transform); ``eval``: bicubic resize of the
    short side to ``floor(image_size / crop_pct)`` and a center crop (timm's evaluation transform).
    """
    bicubic = v2.InterpolationMode.BICUBIC
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
