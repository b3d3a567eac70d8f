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
    normalize: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor ``[3, image_size, image_size]``, or with ``normalize=False`` the
    uint8 tensor before scaling and normalisation (for :class:`DeviceNormalize` on the accelerator).

    ``mae``: RandomResizedCrop(scale 0.2-1, bicubic) and horizontal flip (the MAE recipe); ``clip``:
    RandomResizedCrop(scale 0.9-1, bicubic) (open_clip's training transform); ``classify``: timm's training
    transform (``timm.data.create_transform(is_training=True)``, bicubic) with ``augment`` as its keyword
    arguments, e.g. ``auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25`` (MAE's fine-tuning recipe);
    ``eval``: bicubic resize of the short side to ``floor(image_size / crop_pct)`` and a center crop (timm's
    evaluation transform).
    """
    if augment is not None and task != "classify":
        raise ValueError(f"augment options apply to task 'classify', not {task!r}")
    if not normalize and task == "classify":
        raise ValueError("task 'classify' always normalises: timm's training transform erases random patches "
                         "of the normalised image")
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
    if not normalize:
        return v2.Compose([*geometry, v2.ToImage()])
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class DeviceNormalize:
    """Scales and normalises uint8 batches from a ``normalize=False`` loader on the device they go to.

    Produces what ``image_transform`` with ``normalize=True`` does, up to float32 rounding, while the loader's
    workers collate, share and the host copies a quarter of the bytes (the prefetcher idea of timm's loader).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised ``dtype`` on ``device`` (asynchronous from pinned memory)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"DeviceNormalize takes uint8 images [B, {self.mean.shape[1]}, H, W] from a loader built "
                             f"with normalize=False, got {images.dtype} of shape {tuple(images.shape)}")
        images = images.to(device, non_blocking=True)
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().sub_(self.mean).div_(self.std).to(dtype)
