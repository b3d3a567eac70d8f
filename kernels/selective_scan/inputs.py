"""Input checks shared by ``vig_kernels.bi_selective_scan`` and the fused kernel's entry point."""
from __future__ import annotations

import torch

DIMS = {"u": 4, "delta": 4, "A": 3, "B": 4, "C": 4, "D": 2}


def check_inputs(u, delta, A, B, C, D) -> None:
    """Raise ``TypeError`` or ``ValueError`` naming the argument where the inputs do not fit the op's layout:
    u, delta ``[2, B, T, E]``, A ``[2, E, N]``, B, C ``[2, B, T, N]``, D ``[2, E]``, T >= 1, floating point tensors
    on one device."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"bi_selective_scan: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != DIMS[name]:
            raise ValueError(f"bi_selective_scan: {name} must have {DIMS[name]} dims, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"bi_selective_scan: {name} must be floating point, got {tensor.dtype}")
        if tensor.device != u.device:
            raise ValueError(f"bi_selective_scan: {name} is on {tensor.device} but u is on {u.device}")
    if u.shape[0] != 2:
        raise ValueError(f"bi_selective_scan: u must be [2, B, T, E] (one slice per direction), got shape "
                         f"{tuple(u.shape)}")
    _, batch, length, channels = u.shape
    if length == 0:
        raise ValueError(f"bi_selective_scan: the sequence is empty (u has shape {tuple(u.shape)}); T must be >= 1")
    state = A.shape[-1]
    expected = {"delta": (2, batch, length, channels), "A": (2, channels, state), "B": (2, batch, length, state),
                "C": (2, batch, length, state), "D": (2, channels)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"bi_selective_scan: {name} has shape {tuple(named[name].shape)}, expected {shape}")
