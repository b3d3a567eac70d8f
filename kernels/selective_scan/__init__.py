"""Vim's bidirectional selective scan.

``bi_selective_scan(u, delta, A, B, C, D)`` runs Mamba's S6 recurrence forward (direction 0) and
backward (direction 1) with per-direction parameters, all in natural token order, and returns
``(y_fwd + y_bwd) / 2``. Shapes: u, delta ``[2, B, T, E]``; A ``[2, E, N]``; B, C ``[2, B, T, N]``;
D ``[2, E]``. ``delta`` is the step after softplus; ``A = -exp(A_log)``.

Backend ``auto`` (``vig_kernels.set_backend``) runs the fused Triton kernel (``fused.py``) on CUDA inputs and
the reference on CPU; ``triton`` raises instead of falling back; ``reference`` always runs the reference.
"""
from __future__ import annotations

import torch

from ..backend import get_backend, import_fused
from .reference import bi_selective_scan_reference, selective_scan

_FUSED, _FUSED_IMPORT_ERROR = import_fused(__name__)


def _check_inputs(u, delta, A, B, C, D) -> None:
    if u.dim() != 4 or u.shape[0] != 2:
        raise ValueError(f"bi_selective_scan: u must be [2, B, T, E], got shape {tuple(u.shape)}")
    _, batch, length, channels = u.shape
    if length == 0:
        raise ValueError(f"bi_selective_scan: the sequence is empty (u has shape {tuple(u.shape)}); T must be >= 1")
    expected = {"delta": (2, batch, length, channels), "A": (2, channels, A.shape[-1]),
                "B": (2, batch, length, A.shape[-1]), "C": (2, batch, length, A.shape[-1]), "D": (2, channels)}
    for name, tensor in {"delta": delta, "A": A, "B": B, "C": C, "D": D}.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"bi_selective_scan: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        if tensor.device != u.device:
            raise ValueError(f"bi_selective_scan: {name} is on {tensor.device} but u is on {u.device}")
        if not tensor.is_floating_point():
            raise TypeError(f"bi_selective_scan: {name} must be floating point, got {tensor.dtype}")


def triton_unsupported_reason(u, delta, A, B, C, D) -> str | None:
    """Why the fused kernel would not run these inputs (None if it would)."""
    if _FUSED is None:
        return f"the Triton kernel could not be imported ({_FUSED_IMPORT_ERROR})"
    return _FUSED.unsupported_reason(u, delta, A, B, C, D)


def bi_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor) -> torch.Tensor:
    """Bidirectional selective scan; returns ``(y_fwd + y_bwd) / 2`` ``[B, T, E]`` in u's dtype."""
    _check_inputs(u, delta, A, B, C, D)
    backend = get_backend()
    if backend == "reference" or (backend == "auto" and not u.is_cuda):
        return bi_selective_scan_reference(u, delta, A, B, C, D)
    reason = triton_unsupported_reason(u, delta, A, B, C, D)
    if reason is None:
        return _FUSED.bi_selective_scan_triton(u, delta, A, B, C, D)
    if backend == "triton":
        raise RuntimeError(f"bi_selective_scan: the 'triton' backend cannot run these inputs: {reason}")
    return bi_selective_scan_reference(u, delta, A, B, C, D)


__all__ = ["bi_selective_scan", "bi_selective_scan_reference", "selective_scan", "triton_unsupported_reason"]
