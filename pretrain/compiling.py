"""``train.compile``: torch.compile a model in place, block by block, before ``accelerator.prepare``.

In place (``nn.Module.compile``) rather than through ``torch.compile(model)`` or accelerate's dynamo plugin, whose
wrappers add ``_orig_mod.`` to parameter names: compiled and eager runs then share checkpoints, exports and
``accelerator.get_state_dict``, and DDP and DeepSpeed wrap the same module either way. Each repeated block (a
``ModuleList`` of one class, such as ViG's blocks or MAE's decoder blocks) is compiled once and reused, and every
other leaf module on its own, which is accelerate's regional compilation (``compile_regions_deepspeed`` works on any
module); the glue between modules stays eager.

Shapes are static (``dynamic=False``): a new input size (evaluation at another resolution, a segmentation or
detection batch of another size) compiles the blocks again for that size rather than once for symbolic sizes,
whose inductor lowering failed on ViG's blocks after such a change (torch 2.11, "cannot determine truth value of
Relational"). Past torch's recompile limit (8 by default) a block runs eagerly.
"""
from __future__ import annotations

from accelerate.utils import compile_regions_deepspeed
from torch import nn


def compile_blocks(model: nn.Module, enabled: bool) -> nn.Module:
    """Compile ``model``'s blocks in place with inductor when ``enabled``; returns ``model``."""
    if enabled:
        compile_regions_deepspeed(model, dynamic=False)
    return model
