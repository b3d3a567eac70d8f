"""Small pieces shared by the model families."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def square_grid(positions: int, model_name: str) -> tuple[int, int]:
    """The grid of a checkpoint's ``pos_embed`` from its number of grid positions (only square grids can be
    told from the count alone)."""
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(
            f"{model_name}: the checkpoint's pos_embed holds {positions} grid positions, not a square grid, so its "
            "height and width cannot be told from the tensor; create the model with the img_size it was trained "
            "at (an export's config.json has it under model_args), or load an export folder with "
            "timm.create_model('local-dir:<folder>', pretrained=True)")
    return side, side


def adopt_position_grid(model: nn.Module, stored: torch.Tensor | None, prefix_tokens: int) -> None:
    """Give ``model.pos_embed`` the grid of a checkpoint's ``stored`` table before it is loaded, keeping the
    parameter's dtype, device and ``requires_grad``. Lossless, since forward resamples to the input grid anyway."""
    own = model.pos_embed
    if stored is None or stored.shape[1] == own.shape[1] or stored.shape[-1] != own.shape[-1]:
        return
    model.pos_grid = square_grid(stored.shape[1] - prefix_tokens, type(model).__name__)
    model.pos_embed = nn.Parameter(own.new_empty(stored.shape), requires_grad=own.requires_grad)


def first_conv_weights(model: nn.Module) -> tuple[str, ...]:
    """The stem weight of ``model``, named as in its ``pretrained_cfg``."""
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    return (first_conv + ".weight",) if first_conv else ()


def classifier_name(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is model.get_classifier())


def fit_checkpoint(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                   shape_may_differ: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit a checkpoint (already in this project's key names) to ``model``'s classifier and check the rest.

    Classifier entries the model lacks or holds in another shape (another ``num_classes``, a headless model) are
    dropped; where the checkpoint has none (a headless export, fine-tuned with a new head) the model's own
    initialisation is kept. Every other key must match: raises ``KeyError`` naming missing and unexpected keys
    and ``ValueError`` naming a shape mismatch, except for ``pos_embed`` with another number of positions (the
    model adopts the checkpoint's grid) and the keys in ``shape_may_differ``. Returns the fitted state dict and
    the dropped keys.
    """
    own = model.state_dict()
    head = classifier_name(model) + "."
    fitted, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(head) and (key not in own or own[key].shape != value.shape):
            dropped.append(key)
        else:
            fitted[key] = value
    fitted.update({key: value for key, value in own.items() if key.startswith(head) and key not in fitted})
    missing, unexpected = sorted(set(own) - set(fitted)), sorted(set(fitted) - set(own))
    if missing or unexpected:
        hint = ""
        prefixes = [key[:-len(missing[0])] for key in unexpected if missing and key.endswith("." + missing[0])]
        if prefixes:
            hint = (f"; the checkpoint holds the model's keys under the prefix {prefixes[0]!r} (an open_clip model "
                    "file or a training checkpoint?): load the tower's own file, e.g. an export's "
                    "image_tower/model.safetensors")
        raise KeyError(f"checkpoint does not fit {type(model).__name__}: {len(missing)} missing keys {missing[:8]}, "
                       f"{len(unexpected)} unexpected keys {unexpected[:8]}{hint}")
    for key, value in fitted.items():
        mine = own[key].shape
        other_grid = key == "pos_embed" and value.shape[-1] == mine[-1]
        if value.shape != mine and key not in shape_may_differ and not other_grid:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(mine)}")
    return fitted, dropped
