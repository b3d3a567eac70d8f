"""Small pieces shared by the model families."""
from __future__ import annotations

import torch
from torch import nn


class Permute(nn.Module):
    """Reorders dimensions; occupies the parameter-free slots of the official ``nn.Sequential`` stems."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def check_input(x: torch.Tensor, in_chans: int, stride: int, model_name: str) -> None:
    """Reject an image batch the model cannot take, naming the problem."""
    if x.dim() != 4:
        raise ValueError(f"{model_name} expects an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{model_name} expects {in_chans} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}); create the model with in_chans={x.shape[1]}")
    height, width = x.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"{model_name} needs input height and width divisible by its stride {stride}, "
                         f"got {height}x{width}")


def fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Promote half precision to fp32 for numerically sensitive parts, leaving fp64 alone."""
    return x if x.dtype == torch.float64 else x.float()
