"""Plain-PyTorch selective scan (Mamba's S6 recurrence) in both directions, as Vim uses it.

Per channel ``d`` and state ``n``: ``h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t`` and
``y_t = h_t . C_t + D u_t``. The scan runs chunk by chunk, and inside a chunk step by step: the recurrence
multiplies decays ``<= 1`` only, so it cannot overflow for any ``delta >= 0``. Each chunk is recomputed in the
backward pass (activation checkpointing), so memory stays ``O(B T (E + N))`` instead of ``O(B T E N)`` for the
states. Stepping keeps the live states at ``[b, E, N]``; a log-depth scan inside the chunk (what the Triton kernel
does) allocated ``[b, chunk, E, N]`` tensors at every doubling, and on a CPU their churn through the C allocator
held about 20 GB for one Vim-T forward at 320 px and batch 3, against 3–5 GB stepping. The stepped backward is
slower; ``benchmarks/reference_scan_cpu.py`` measures both, and ``docs/selective_scan.md`` has the figures.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = 16


def _scan_chunk(state, u, delta, A, B, C):
    """Scan one chunk from ``state`` [b, E, N]; u, delta [b, L, E]; A [b, E, N]; B, C [b, L, N]."""
    decay = (delta.unsqueeze(-1) * A.unsqueeze(1)).exp()
    inflow = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    outputs = []
    for t in range(u.shape[1]):
        state = decay[:, t] * state + inflow[:, t]
        outputs.append(torch.einsum("ben,bn->be", state, C[:, t]))
    return torch.stack(outputs, dim=1), state


# Under autocast the products below would run in 16 bits; the reference computes in fp32 (fp64) whatever is active.
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def selective_scan(u, delta, A, B, C, D=None, reverse: bool = False, chunk: int = CHUNK):
    """u, delta ``[b, T, E]`` (delta >= 0, after softplus), A ``[E, N]`` or ``[b, E, N]`` (<= 0),
    B, C ``[b, T, N]``, D ``[E]`` or ``[b, E]``. ``reverse`` scans from the last token to the first.
    Returns y ``[b, T, E]`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (x.to(dtype) for x in (u, delta, A, B, C))
    if reverse:
        u, delta, B, C = (x.flip(1) for x in (u, delta, B, C))
    batch, length, channels = u.shape
    if length == 0:
        return u.new_zeros(batch, 0, channels)
    if A.dim() == 2:
        A = A.expand(batch, *A.shape)
    state = u.new_zeros(batch, channels, A.shape[-1])
    outputs = []
    grad_needed = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C))
    for start in range(0, length, chunk):
        pieces = (state, u[:, start:start + chunk], delta[:, start:start + chunk], A,
                  B[:, start:start + chunk], C[:, start:start + chunk])
        if grad_needed:
            y, state = checkpoint(_scan_chunk, *pieces, use_reentrant=False)
        else:
            y, state = _scan_chunk(*pieces)
        outputs.append(y)
    y = torch.cat(outputs, dim=1)
    if D is not None:
        y = y + u * (D.to(dtype) if D.dim() == 1 else D.to(dtype).unsqueeze(1))
    return y.flip(1) if reverse else y


def bi_selective_scan_reference(u, delta, A, B, C, D):
    """Both directions with their own parameters, stacked on a leading axis of size 2 (0 = forward,
    1 = backward, both in natural token order): u, delta ``[2, b, T, E]``, A ``[2, E, N]``,
    B, C ``[2, b, T, N]``, D ``[2, E]``. Returns ``(y_fwd + y_bwd) / 2`` ``[b, T, E]`` in u's dtype."""
    batch = u.shape[1]
    # One scan over both directions: the backward one is time-reversed and stacked along the batch.
    to_scan_order = lambda x: torch.cat([x[0], x[1].flip(1)])  # noqa: E731
    per_sequence = lambda x: x.repeat_interleave(batch, dim=0)  # noqa: E731
    y = selective_scan(to_scan_order(u), to_scan_order(delta), per_sequence(A), to_scan_order(B),
                       to_scan_order(C), per_sequence(D))
    return ((y[:batch] + y[batch:].flip(1)) / 2).to(u.dtype)
