"""Plain-PyTorch bidirectional gated linear attention with ViG's semantics.

Exact for any finite gates ``g <= 0`` (no clamping; a gate of ``-inf`` makes later outputs NaN): inside a chunk
the decays are taken pairwise in log space, ``exp(F_t - F_s)`` with ``s <= t``, and between chunks the running
state only ever meets exponents ``<= 0``, so nothing can overflow. Runs on any device and dtype; computes in fp32
(fp64 for fp64 inputs), also under autocast.
The backward direction is the forward recurrence on the time-reversed sequence, which is what ViG defines.
"""
from __future__ import annotations

import torch

CHUNK = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
               chunk: int = CHUNK) -> torch.Tensor:
    """One direction, ``o_t = sum_{s<=t} (scale q_t * exp(F_t - F_s) . k_s) v_s`` with ``F`` the inclusive
    prefix sum of ``g``. Layout ``[B, H, T, D]``; returns ``[B, H, T, V]``."""
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    if length == 0:
        return q.new_zeros(batch, heads, 0, value_dim)
    chunk = min(chunk, length)
    pad = (-length) % chunk
    if pad:
        # Zero keys add nothing and zero log-gates decay nothing, so padding is exact.
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    n = (length + pad) // chunk
    q, k, g = (x.reshape(batch, heads, n, chunk, key_dim) for x in (q, k, g))
    v = v.reshape(batch, heads, n, chunk, value_dim)

    cum = g.cumsum(-2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    exponent = (cum.unsqueeze(-2) - cum.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
    scores = torch.einsum("...tk,...sk,...tsk->...ts", q, k, exponent.exp())
    out = scores @ v

    total = cum[..., -1, :]
    chunk_states = (k * (total.unsqueeze(-2) - cum).exp()).transpose(-1, -2) @ v
    decay = total.exp().unsqueeze(-1)
    state = q.new_zeros(batch, heads, key_dim, value_dim)
    incoming = []
    for i in range(n):
        incoming.append(state)
        state = decay[:, :, i] * state + chunk_states[:, :, i]
    out = out + (q * cum.exp()) @ torch.stack(incoming, dim=2)
    return (scale * out).reshape(batch, heads, n * chunk, value_dim)[:, :, :length]


# Under autocast the matmuls below would run in 16 bits; the reference computes in fp32 (fp64) whatever is active.
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def bigla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor,
                    g_bwd: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``(o_fwd + o_bwd) / 2`` in ``[B, T, H, D]`` layout, both directions including the diagonal."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(q.dtype)
    q, k, v, g_fwd, g_bwd = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g_fwd, g_bwd))
    out_fwd = causal_gla(q, k, v, g_fwd, scale)
    flip = lambda x: x.flip(2)  # noqa: E731
    out_bwd = flip(causal_gla(flip(q), flip(k), flip(v), flip(g_bwd), scale))
    return ((out_fwd + out_bwd) / 2).transpose(1, 2).to(out_dtype)
