"""Loading checkpoints released with the official ViG, ViG-H and Vim code.

Our parameter names are the official ones, so the key map is small and lives next to each model:
``vig.vig.map_official_keys`` (ViG-H legacy renames, ``Linear2d`` weights stored as ``(out, in, 1, 1)``); Vim
needs none. This function adds the container handling around it, resamples ``pos_embed`` to the model's grid,
fits the classifier and loads strictly.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import vig as vig_family
from . import vim as vim_family
from ._common import fit_checkpoint

CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def _unwrap(checkpoint: Mapping, use_ema: bool) -> Mapping:
    order = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict")
    for key in order:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint
    raise KeyError(f"checkpoint holds no state dict: expected tensors or one of the keys {CONTAINER_KEYS}, "
                   f"found {sorted(checkpoint)[:10]}")


def load_official_state_dict(model: nn.Module, checkpoint: Mapping, use_ema: bool = False) -> dict[str, list[str]]:
    """Load an official checkpoint (or one saved by this project) into ``model`` strictly.

    Accepts a raw state dict or a container holding it under ``model``/``state_dict`` (``model_ema`` with
    ``use_ema=True``), strips a DDP ``module.`` prefix, applies the family's key map, drops the classifier
    when its shape differs from the model's (e.g. ``num_classes=0``) and keeps the model's fresh classifier when
    the checkpoint has none. A ``pos_embed`` of another square grid is resampled to the model's grid (around
    Vim's class entry). Returns ``{"dropped": [...]}`` listing the keys left out on purpose; raises ``KeyError``
    naming missing or unexpected keys and ``ValueError`` naming a key whose shape differs.
    """
    state_dict = {key.removeprefix("module."): value for key, value in _unwrap(checkpoint, use_ema).items()}
    family = vim_family if isinstance(model, vim_family.Vim) else vig_family
    state_dict, dropped = fit_checkpoint(family.map_official_keys(state_dict, model), model)
    state_dict = family.resample_to_model_grid(state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    return {"dropped": dropped}
