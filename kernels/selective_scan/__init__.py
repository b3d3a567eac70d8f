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
from .inputs import check_inputs
from .reference import bi_selective_scan_reference, selective_scan

_FUSED, _FUSED_IMPORT_ERROR = import_fused(__name__)


def triton_unsupported_reason(u, delta, A, B, C, D) -> str | None:
    """Why the fused kernel would not run these inputs (None if it would)."""
    if _FUSED is None:
        return f"the Triton kernel could not be imported ({_FUSED_IMPORT_ERROR})"
    return _FUSED.unsupported_reason(u, delta, A, B, C, D)


def bi_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor) -> torch.Tensor:
    """Bidirectional selective scan; returns ``(y_fwd + y_bwd) / 2`` ``[B, T, E]`` in u's dtype."""
    check_inputs(u, delta, A, B, C, D)
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
