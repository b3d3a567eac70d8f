"""``train.compile``: torch.compile a model in place, block by block, before ``accelerator.prepare``.

In place (``nn.Module.compile``) rather than through ``torch.compile(model)`` or accelerate's dynamo plugin, whose
wrappers add ``_orig_mod.`` to parameter names: compiled and eager runs then share checkpoints, exports and
``accelerator.get_state_dict``, and DDP and DeepSpeed wrap the same module either way.

The regions follow accelerate's regional compilation (its ``compile_regions_deepspeed``): each repeated block is
compiled once and reused, every other subtree as one unit, and the glue between them stays eager. It differs where
that would miss blocks or compile nothing useful:

* repeated blocks that hold repeated blocks themselves (ViG-H's stages) are entered: ViG-H runs a stage's blocks one
  by one rather than through the stage's own call, which would leave a compiled stage unused;
* an ``nn.Sequential`` of one composite class counts as repeated blocks (timm's ViT keeps its blocks in one);
* subtrees without parameters (dropout, identity) and bare ``nn.Sequential`` subtrees (ViG-H's downsampling) stay
  eager: dynamo does not trace a compiled ``Sequential``'s own forward but starts a frame in each user-defined module
  it calls, so ViG-H's ``Permute`` layers were compiled once per shape until torch's recompile limit.

Shapes are static (``dynamic=False``): a new input size (evaluation at another resolution, a segmentation or
detection batch of another size) compiles a block again for that size rather than once for symbolic sizes, whose
inductor lowering failed on ViG's blocks after such a change (torch 2.11, "cannot determine truth value of
Relational"). Past torch's recompile limit (8 by default) a block runs eagerly.
"""
from __future__ import annotations

from torch import nn


def is_repeated_blocks(module: nn.Module) -> bool:
    """A ``ModuleList``, or a ``Sequential`` of modules that have submodules, whose children share one class."""
    children = list(module.children())
    if not children or not all(type(child) is type(children[0]) for child in children):
        return False
    return isinstance(module, nn.ModuleList) or (isinstance(module, nn.Sequential) and any(children[0].children()))


def has_repeated_blocks(module: nn.Module) -> bool:
    return any(is_repeated_blocks(submodule) for submodule in module.modules())


def compile_regions(module: nn.Module) -> None:
    if is_repeated_blocks(module):
        for block in module.children():
            if has_repeated_blocks(block):
                compile_regions(block)
            else:
                block.compile(dynamic=False)
    elif has_repeated_blocks(module):
        for child in module.children():
            compile_regions(child)
    elif next(module.parameters(), None) is not None and not isinstance(module, nn.Sequential):
        module.compile(dynamic=False)


def compile_blocks(model: nn.Module, enabled: bool) -> nn.Module:
    """Compile ``model``'s blocks in place with inductor when ``enabled``; returns ``model``."""
    if enabled:
        compile_regions(model)
    return model
