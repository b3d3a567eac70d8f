"""A pretrained ViG, ViG-H or Vim tower with a light semantic-segmentation decoder.

Isotropic towers (ViG, Vim) give one stride-16 map per block; four evenly spaced blocks are resampled to strides
4, 8, 16 and 32 (BEiT's and MAE's UperNet input: two 2x deconvolutions, one, identity, 2x max pooling). ViG-H's four
stage outputs already sit at those strides. A semantic-FPN head (Kirillov et al., Panoptic FPN) fuses the pyramid:
1x1 laterals, a top-down pathway, each level brought to stride 4 and summed, a 3x3 conv and a 1x1 classifier whose
logits are upsampled bilinearly to the input size.
"""
from __future__ import annotations

import math
import re

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn import functional as F

PYRAMID_STRIDES = (4, 8, 16, 32)


def resample(channels: int, stride: int, target: int) -> nn.Module:
    """Bring a map of ``stride`` to ``target`` stride: learned 2x upsampling steps, identity or max pooling."""
    if stride == target:
        return nn.Identity()
    if stride < target:
        return nn.MaxPool2d(target // stride)
    steps = [nn.ConvTranspose2d(channels, channels, 2, stride=2)]
    for _ in range(int(math.log2(stride // target)) - 1):
        steps += [LayerNorm2d(channels), nn.GELU(), nn.ConvTranspose2d(channels, channels, 2, stride=2)]
    return nn.Sequential(*steps)


class FPNHead(nn.Module):
    def __init__(self, in_channels: list[int], dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), LayerNorm2d(dim)) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), LayerNorm2d(dim), nn.GELU(), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        maps = [lateral(x) for lateral, x in zip(self.laterals, pyramid)]
        for level in range(len(maps) - 2, -1, -1):  # top-down: coarse context into finer levels
            maps[level] = maps[level] + F.interpolate(maps[level + 1], size=maps[level].shape[-2:], mode="nearest")
        finest = maps[0].shape[-2:]
        fused = sum(F.interpolate(smooth(x), size=finest, mode="bilinear", align_corners=False)
                    for smooth, x in zip(self.smooth, maps))
        return self.classifier(self.fuse(fused))


def prefixed_groups(groups: dict, prefix: str) -> dict:
    """A timm ``group_matcher()`` result for a module that now sits at ``prefix`` inside a larger model."""
    def prefixed(pattern: str) -> str:
        return re.sub(r"\^", "^" + re.escape(prefix + "."), pattern)

    return {name: prefixed(rule) if isinstance(rule, str) else [(prefixed(p), order) for p, order in rule]
            for name, rule in groups.items()}


class TowerPyramid(nn.Module):
    """A headless timm tower of this package (it provides ``forward_intermediates``) as a 4-level pyramid at
    strides 4-32 (:meth:`pyramid`); the base of the segmenter and of the detector's backbone (``detector.py``)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        info = backbone.feature_info
        if len({entry["reduction"] for entry in info}) == len(PYRAMID_STRIDES) == len(info):
            self.indices = list(range(len(info)))
        else:
            if len(info) < len(PYRAMID_STRIDES):
                raise ValueError(f"{type(backbone).__name__} has {len(info)} blocks; the pyramid takes 4")
            self.indices = [len(info) * (level + 1) // len(PYRAMID_STRIDES) - 1 for level in range(4)]
        chosen = [info[index] for index in self.indices]
        self.pyramid_channels = [entry["num_chs"] for entry in chosen]
        self.resample = nn.ModuleList(resample(entry["num_chs"], entry["reduction"], target)
                                      for entry, target in zip(chosen, PYRAMID_STRIDES))
        self.pretrained_cfg = backbone.pretrained_cfg

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone.forward_intermediates(images, indices=self.indices, norm=True,
                                                       intermediates_only=True)
        return [resample(x) for resample, x in zip(self.resample, features)]

    def group_matcher(self, coarse: bool = False) -> dict:
        """The tower's layer groups under ``backbone.``; everything else, unmatched, trains at the full LR."""
        return prefixed_groups(self.backbone.group_matcher(coarse), "backbone")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class Segmenter(TowerPyramid):
    def __init__(self, backbone: nn.Module, num_classes: int, decoder_dim: int = 256, dropout: float = 0.1):
        super().__init__(backbone)
        self.decode_head = FPNHead(self.pyramid_channels, decoder_dim, num_classes, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.pyramid(images))
        return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
