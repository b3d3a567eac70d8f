"""AdamW with the usual weight-decay exclusions, the per-update warm-up + cosine schedule, and MAE's LR scaling."""

from __future__ import annotations

import logging

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

logger = logging.getLogger(__name__)

# Learned tokens, position embeddings and CLIP's logit scale/bias are not weights to shrink toward zero.
NO_DECAY_PATTERNS = ("*_token", "*pos_embed", "*logit_scale", "*logit_bias")


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Full names from ``no_weight_decay()`` of ``model`` and of every submodule that defines it."""
    names = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(f"{prefix}.{name}" if prefix else name for name in declared())
    return names


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Trainable parameters split into a decayed group and a ``weight_decay=0`` group.

    Not decayed: parameters with at most one dimension (norms, biases), names declared by any module's
    ``no_weight_decay()``, and token-like names (:data:`NO_DECAY_PATTERNS`). Frozen parameters are left out.
    With ``layer_decay`` below 1, each layer of the model's ``group_matcher()`` (stem, blocks, head) gets its own
    groups with ``lr_scale = layer_decay ** (layers above it)`` (timm's ``param_groups_layer_decay``).
    """
    excluded = no_weight_decay_names(model) | set(NO_DECAY_PATTERNS)
    if layer_decay is not None and layer_decay < 1:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"layer-wise LR decay needs the model's group_matcher(); {type(model).__name__} has none")
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=excluded, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=excluded)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; build it before ``accelerator.prepare`` (which wraps it)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=betas, eps=eps)


def warmup_updates(optim, updates_per_epoch: int, total_updates: int) -> int:
    """The recipe's warm-up in optimizer updates: ``optim.warmup_steps`` when set, else ``optim.warmup_epochs``;
    cut, with a warning, to one update less than the schedule when it is not shorter (a short demo or test run)."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else optim.warmup_epochs * updates_per_epoch
    if warmup >= total_updates:
        logger.warning("the warm-up (optim.warmup_steps or optim.warmup_epochs: %d updates) is not shorter than the "
                       "schedule (optim.epochs: %d updates); warming up for %d", warmup, total_updates,
                       total_updates - 1)
        return total_updates - 1
    return warmup


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr: float = 0.0) -> CosineLRScheduler:
    """Linear warm-up from 0 over ``warmup_steps`` updates, then a half cosine to ``min_lr`` at ``total_steps``.

    Counted in optimizer updates (MAE updates per iteration): update ``n`` (from 0) runs at the LR set by
    ``scheduler.step_update(n)``, so the trainer calls ``scheduler.step_update(train_state.step)`` right before
    ``optimizer.step()`` (repeating it on accumulation micro-steps is harmless); the LR is a function of that
    count alone, so a resumed run continues the curve exactly. It
    is a timm scheduler, which ``accelerator.prepare`` passes through untouched: do not prepare it (a prepared
    torch scheduler would be stepped once per process); register it with
    ``accelerator.register_for_checkpointing`` so checkpoints hold it. Groups with an ``lr_scale`` key get
    that multiple of the LR (layer-wise decay).
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    return CosineLRScheduler(optimizer, t_initial=total_steps - warmup_steps, lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256) -> float:
    """MAE's linear scaling rule: ``lr = base_lr * global_batch / reference``.

    ``global_batch`` is the effective batch of one optimizer update: micro-batch x processes x accumulation.
    """
    return base_lr * global_batch / reference


def parameter_names(model: torch.nn.Module, group: dict) -> list[str]:
    """Names of the parameters in one optimizer group (for logging which parameters skip weight decay)."""
    members = {id(parameter) for parameter in group["params"]}
    return [name for name, parameter in model.named_parameters() if id(parameter) in members]
