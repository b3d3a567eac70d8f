"""Loading checkpoints released with the official ViG, ViG-H and Vim code.

Our parameter names are the official ones, so the key map is small and lives next to each model:
``vig.vig.checkpoint_filter_fn`` (ViG-H legacy renames, ``Linear2d`` weights stored as ``(out, in, 1, 1)``)
and ``vig.vim.checkpoint_filter_fn`` (``pos_embed`` resized for another input size). This function adds the
container handling around them and loads strictly.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import vig as vig_family
from . import vim as vim_family

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
    ``use_ema=True``), strips a DDP ``module.`` prefix, applies the family's key map, and drops the
    classifier when its shape differs from the model's (e.g. ``num_classes=0``). Returns
    ``{"dropped": [...]}`` listing the keys left out on purpose; raises ``KeyError`` naming missing or
    unexpected keys and ``ValueError`` naming a key whose shape differs.
    """
    state_dict = {key.removeprefix("module."): value for key, value in _unwrap(checkpoint, use_ema).items()}
    if isinstance(model, vim_family.Vim):
        state_dict = vim_family.checkpoint_filter_fn(state_dict, model)
    else:
        state_dict = vig_family.checkpoint_filter_fn(state_dict, model)

    own = model.state_dict()
    classifier = next(name for name, module in model.named_modules() if module is model.get_classifier())
    dropped = [key for key in state_dict if key.startswith(classifier + ".")
               and (key not in own or own[key].shape != state_dict[key].shape)]
    for key in dropped:
        del state_dict[key]

    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit {type(model).__name__}: {len(missing)} missing keys "
                       f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}")
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                             f"model {tuple(own[key].shape)}")
    model.load_state_dict(state_dict, strict=True)
    return {"dropped": dropped}
