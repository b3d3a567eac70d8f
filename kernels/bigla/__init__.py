"""Bidirectional gated linear attention (ViG's token mixer).

``bigla(q, k, v, g_fwd, g_bwd, scale=None)`` computes, per batch element and head,

    o = (o_fwd + o_bwd) / 2
    o_fwd_t = sum_{s<=t} (scale * q_t * exp(F_t - F_s) . k_s) v_s,   F_t = sum_{r<=t} g_fwd_r
    o_bwd_t = sum_{s>=t} (scale * q_t * exp(R_t - R_s) . k_s) v_s,   R_t = sum_{r>=t} g_bwd_r

with ``q, k, g_fwd, g_bwd`` of shape ``[B, T, H, K]``, ``v`` of shape ``[B, T, H, V]`` and log-space
gates ``g <= 0`` (``logsigmoid(z) / 16`` in ViG). The diagonal term appears in both directions, so it
carries weight 1 and every other pair weight 1/2. ``scale`` defaults to ``K ** -0.5``.
"""
from __future__ import annotations

import torch

from ..backend import get_backend, import_fused
from .inputs import check_inputs
from .reference import bigla_reference

_FUSED, _FUSED_IMPORT_ERROR = import_fused(__name__)


def triton_unsupported_reason(q, k, v, g_fwd, g_bwd) -> str | None:
    """Why the fused kernel would not run these inputs (None if it would)."""
    if _FUSED is None:
        return f"the Triton kernel could not be imported ({_FUSED_IMPORT_ERROR})"
    return _FUSED.unsupported_reason(q, k, v, g_fwd, g_bwd)


def bigla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
          scale: float | None = None) -> torch.Tensor:
    """Bidirectional GLA with ViG's semantics; returns ``o`` ``[B, T, H, V]`` in ``v``'s dtype.

    Backend ``auto`` runs the fused Triton kernel on CUDA inputs it supports (head dims 16/32/64/128,
    q/k/v in one of float32/bfloat16/float16) and the reference otherwise; ``triton`` raises a
    ``RuntimeError`` naming the problem instead of falling back; ``reference`` always runs the reference.
    The fused kernel clamps the gates to ``[GATE_MIN, 0]`` (see ``docs/kernels.md``).
    """
    check_inputs(q, k, v, g_fwd, g_bwd)
    backend = get_backend()
    if backend == "reference":
        return bigla_reference(q, k, v, g_fwd, g_bwd, scale)
    if backend == "auto" and not q.is_cuda:
        return bigla_reference(q, k, v, g_fwd, g_bwd, scale)
    reason = triton_unsupported_reason(q, k, v, g_fwd, g_bwd)
    if reason is None:
        return _FUSED.bigla_triton(q, k, v, g_fwd, g_bwd, scale)
    if backend == "triton":
        raise RuntimeError(f"bigla: the 'triton' backend cannot run these inputs: {reason}")
    return bigla_reference(q, k, v, g_fwd, g_bwd, scale)


__all__ = ["bigla", "bigla_reference", "triton_unsupported_reason"]
