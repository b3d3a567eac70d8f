"""Input checks shared by ``vig_kernels.bigla`` and the fused kernel's entry point."""
from __future__ import annotations

import torch


def check_inputs(q, k, v, g_fwd, g_bwd) -> None:
    """Raise ``TypeError`` or ``ValueError`` naming the argument where the inputs do not fit the op's layout:
    tensors of 4 dims, ``[B, T, H, K]`` q, k and gates, ``[B, T, H, V]`` v, T >= 1, one device, floating point,
    q, k and v in one dtype (the gates may differ, e.g. fp32 gates with bf16 q, k, v)."""
    named = {"q": q, "k": k, "v": v, "g_fwd": g_fwd, "g_bwd": g_bwd}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"bigla: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"bigla: {name} must have 4 dims [B, T, H, D], got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"bigla: {name} must be floating point, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"bigla: {name} is on {tensor.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"bigla: q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    for name in ("k", "g_fwd", "g_bwd"):
        if named[name].shape != q.shape:
            raise ValueError(f"bigla: {name} has shape {tuple(named[name].shape)}, expected q's shape "
                             f"{tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"bigla: v has shape {tuple(v.shape)}; its [B, T, H] must equal q's {tuple(q.shape[:3])}")
    if q.shape[1] == 0:
        raise ValueError(f"bigla: the sequence is empty (q has shape {tuple(q.shape)}); T must be at least 1")
    if q.shape[-1] == 0:
        raise ValueError(f"bigla: the key head dim is 0 (q has shape {tuple(q.shape)})")
