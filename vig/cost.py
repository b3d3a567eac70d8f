"""Parameter and multiply-accumulate counts that include the token mixers.

fvcore-based counts (the ones in the ViG and Vim papers) skip custom autograd functions and Triton/CUDA
kernels, so they miss ViG's SwiGLU down-projection, both recurrences, and most of Vim's mixer. Here every
``nn.Linear`` and ``nn.Conv*`` is counted from the shapes it actually sees, and the recurrences and the
attention matmuls are added analytically:

* BiGLA (recurrent form, per token, head and direction): decay, outer-product update and read-out of the
  ``d_k x d_v`` state, ``3 d_k d_v`` MACs;
* selective scan (per token, channel and direction): ``3 N`` MACs (decay, input, read-out), counted with
  the depthwise convs and step projections that Vim's mixer applies as functions;
* softmax attention (per head): ``2 N^2 d_head`` MACs for ``QK^T`` and ``AV``.

``fvcore_style_macs`` repeats the published convention (what fvcore sees of the official code), so the
two can be compared side by side.
"""
from __future__ import annotations

import torch
from torch import nn

from .vig import BiGLAMixer, SwiGLU
from .vim import BiMambaMixer

# Layers that the official implementations run inside custom autograd functions, invisible to fvcore.
_HIDDEN_FROM_FVCORE = {SwiGLU: ("down_proj",), BiMambaMixer: ("x_proj", "x_proj_b")}


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kernel = 1
        for size in module.kernel_size:
            kernel *= size
        return output.numel() * (module.in_channels // module.groups) * kernel
    return 0


def _mixer_macs(module: nn.Module, inputs: tuple) -> tuple[int, bool]:
    """MACs of a token mixer's sequence interaction, and whether fvcore counts them (it sees matmuls)."""
    if isinstance(module, BiGLAMixer):
        batch, tokens, dim = inputs[0].shape
        key_dim, value_dim = module.key_dim // module.num_heads, dim // module.num_heads
        return 2 * batch * tokens * module.num_heads * 3 * key_dim * value_dim, False
    if isinstance(module, BiMambaMixer):
        # The scan, plus the convs and dt projections the mixer applies functionally (not as modules).
        batch, tokens, _ = inputs[0].shape
        per_direction = module.inner_dim * (3 * module.d_state + module.conv1d.kernel_size[0] + module.dt_rank)
        return 2 * batch * tokens * per_direction, False
    if type(module).__name__ == "Attention" and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
        batch, tokens, _ = inputs[0].shape
        return 2 * batch * module.num_heads * tokens * tokens * module.head_dim, True
    return 0, False


@torch.no_grad()
def model_cost(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> dict[str, int]:
    """Parameters and MACs of one forward pass of one image.

    Returns ``params``, ``macs`` (everything), ``mixer_macs`` (the recurrences or attention matmuls, part of
    ``macs``) and ``fvcore_style_macs`` (the published convention).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    hidden = {id(getattr(parent, name)) for parent in model.modules() for kind, names in _HIDDEN_FROM_FVCORE.items()
              if isinstance(parent, kind) for name in names}
    totals = {"layers": 0, "mixer": 0, "hidden": 0}

    def hook(module, inputs, output):
        layer = _layer_macs(module, inputs, output)
        mixer, seen_by_fvcore = _mixer_macs(module, inputs)
        totals["layers"] += layer
        totals["mixer"] += mixer
        totals["hidden"] += (layer if id(module) in hidden else 0) + (0 if seen_by_fvcore else mixer)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        model(torch.randn(1, in_chans, height, width, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    macs = totals["layers"] + totals["mixer"]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "mixer_macs": totals["mixer"],
        "fvcore_style_macs": macs - totals["hidden"],
    }
