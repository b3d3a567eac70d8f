"""Fused bidirectional selective scan (Vim's token mixer core) in Triton: forward and backward kernels.

Semantics are those of :func:`vig_kernels.selective_scan.reference.bi_selective_scan_reference`: per direction
``h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t`` (the backward direction runs from the last token to the
first, in natural token order, so nothing is flipped), ``y_t = h_t . C_t + D u_t`` and the output is
``(y_fwd + y_bwd) / 2``. There is no clamp: every decay is ``exp2`` of a number ``<= 0``, so no factor can
overflow for any ``delta >= 0`` and ``A <= 0``.

Algorithm (one program per block of channels, batch element and direction; both directions in one launch):

* The sequence is scanned in chunks of ``CHUNK`` = 16 tokens. A chunk's ``[16, channels, d_state]`` states
  come from a parallel (log-depth) scan of the linear recurrence along the chunk, ``tl.associative_scan``,
  plus the decayed state entering the chunk; only the chunk's last state is carried to the next one.
* The forward adds each direction's ``y / 2`` into an fp32 output with an atomic add. Two addends into a
  zeroed buffer give the same sum in either order, so the result is deterministic.
* The backward recomputes the states: pass 1 scans forward in the direction's order and writes only the
  state entering each chunk (``d_state x channels`` per chunk) to a workspace; pass 2 walks the chunks in
  reverse, rebuilds each chunk's states from its entering state, and scans the state gradient
  ``dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}`` backwards, again as a parallel scan per chunk. The decay
  term of the gradients needs ``exp(delta_t A) h_{t-1}``, which is ``h_t - delta_t u_t B_t``: no division by a
  decay, so no blow-up when a decay underflows. Gradients of B and C are per-block partials summed
  afterwards, those of A and D per-batch partials (no atomics, deterministic).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import on_device_of
from .inputs import check_inputs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STATE_DIM = 64
CHUNK = 16  # tokens per chunk step

# Tunables (channels per program and warps; swept on a GPU by benchmarks/selective_scan.py).
FWD_BLOCK_E = 32
FWD_WARPS = 4
BWD_BLOCK_E = 16
BWD_WARPS = 4

_LOG2E = tl.constexpr(1.4426950408889634)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _linear_recurrence(decay_left, value_left, decay_right, value_right):
    """Combine of ``x_t = a_t x_{t-1} + b_t``: two consecutive steps as one."""
    return decay_left * decay_right, value_left * decay_right + value_right


@triton.jit
def _chunk_positions(chunk, rows, length, direction, CH: tl.constexpr):
    """Token positions of a chunk's rows in scan order (reversed for direction 1) and which rows exist."""
    steps = chunk * CH + rows
    valid = steps < length
    positions = tl.where(direction == 0, steps, length - 1 - steps)
    return positions, valid


@triton.jit
def _load_chunk(u_base, delta_base, B_base, C_base, positions, valid, e, e_mask, n, n_mask, su_t, sd_t, sB_t, sC_t):
    """u, delta ``[CH, BLOCK_E]`` and B, C ``[CH, BLOCK_N]`` of a chunk's rows in fp32, zero where masked."""
    tile_mask = valid[:, None] & e_mask[None, :]
    state_mask = valid[:, None] & n_mask[None, :]
    u = tl.load(u_base + positions[:, None] * su_t + e[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_base + positions[:, None] * sd_t + e[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    B = tl.load(B_base + positions[:, None] * sB_t + n[None, :], mask=state_mask, other=0.0).to(tl.float32)
    C = tl.load(C_base + positions[:, None] * sC_t + n[None, :], mask=state_mask, other=0.0).to(tl.float32)
    return u, delta, B, C


@triton.jit
def _chunk_states(state, u, delta, A_log2, B):
    """The states of a chunk's rows ``[CH, BLOCK_E, BLOCK_N]`` from the state entering it, and the inflow
    ``delta u B`` of each row (rows past the sequence end have ``delta = 0``: decay 1, no inflow)."""
    decay = tl.exp2(delta[:, :, None] * A_log2[None, :, :])
    inflow = (delta * u)[:, :, None] * B[:, None, :]
    decay_prefix, local = tl.associative_scan((decay, inflow), 0, _linear_recurrence)
    return local + decay_prefix * state[None, :, :], inflow


@triton.jit
def _row(tile, rows, index):
    """Row ``index`` of a ``[CH, BLOCK_E, BLOCK_N]`` tile."""
    return tl.sum(tl.where((rows == index)[:, None, None], tile, 0.0), axis=0)


@triton.jit
def _bi_scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, out_ptr,
                        su_d, su_b, su_t, sd_d, sd_b, sd_t, sA_d, sA_e, sB_d, sB_b, sB_t, sC_d, sC_b, sC_t, sD_d,
                        so_b, so_t, length, channels, d_state,
                        N_CHUNKS: tl.constexpr, CH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    e_block = tl.program_id(0)
    # 64-bit offsets: direction x batch x length x channels passes 2**31 at large shapes.
    batch, direction = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    e = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < channels
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    rows = tl.arange(0, CH)
    A_log2 = tl.load(A_ptr + direction * sA_d + e[:, None] * sA_e + n[None, :],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32) * _LOG2E
    D = tl.load(D_ptr + direction * sD_d + e, mask=e_mask, other=0.0).to(tl.float32)
    u_base = u_ptr + direction * su_d + batch * su_b
    delta_base = delta_ptr + direction * sd_d + batch * sd_b
    B_base = B_ptr + direction * sB_d + batch * sB_b
    C_base = C_ptr + direction * sC_d + batch * sC_b
    out_base = out_ptr + batch * so_b

    state = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        positions, valid = _chunk_positions(chunk, rows, length, direction, CH)
        tile_mask = valid[:, None] & e_mask[None, :]
        u, delta, B, C = _load_chunk(u_base, delta_base, B_base, C_base, positions, valid, e, e_mask, n, n_mask,
                                     su_t, sd_t, sB_t, sC_t)
        states, _ = _chunk_states(state, u, delta, A_log2, B)
        y = tl.sum(states * C[:, None, :], axis=2) + D[None, :] * u
        tl.atomic_add(out_base + positions[:, None] * so_t + e[None, :], 0.5 * y, mask=tile_mask, sem="relaxed")
        state = _row(states, rows, CH - 1)


@triton.jit
def _bi_scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dout_ptr, work_ptr,
                        du_ptr, ddelta_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr,
                        su_d, su_b, su_t, sd_d, sd_b, sd_t, sA_d, sA_e, sB_d, sB_b, sB_t, sC_d, sC_b, sC_t, sD_d,
                        sdo_b, sdo_t, batches, length, channels, d_state,
                        N_CHUNKS: tl.constexpr, CH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    e_block = tl.program_id(0)
    # 64-bit offsets: direction x batch x length x channels passes 2**31 at large shapes.
    batch, direction = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    e_blocks = tl.num_programs(0)
    e_local = tl.arange(0, BLOCK_E)
    e = e_block * BLOCK_E + e_local
    e_mask = e < channels
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    rows = tl.arange(0, CH)
    param_mask = e_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + direction * sA_d + e[:, None] * sA_e + n[None, :], mask=param_mask, other=0.0).to(tl.float32)
    A_log2 = A * _LOG2E
    D = tl.load(D_ptr + direction * sD_d + e, mask=e_mask, other=0.0).to(tl.float32)
    sequence = direction * batches + batch
    u_base = u_ptr + direction * su_d + batch * su_b
    delta_base = delta_ptr + direction * sd_d + batch * sd_b
    B_base = B_ptr + direction * sB_d + batch * sB_b
    C_base = C_ptr + direction * sC_d + batch * sC_b
    dout_base = dout_ptr + batch * sdo_b
    # Contiguous [2, batches, length, channels] / [e_blocks, 2, batches, length, d_state] / [2, batches, ...].
    du_base = du_ptr + sequence * length * channels
    ddelta_base = ddelta_ptr + sequence * length * channels
    dB_base = dB_ptr + (e_block * 2 * batches + sequence) * length * d_state
    dC_base = dC_ptr + (e_block * 2 * batches + sequence) * length * d_state
    work_base = work_ptr + (sequence * e_blocks + e_block) * N_CHUNKS * BLOCK_E * BLOCK_N
    work_tile = e_local[:, None] * BLOCK_N + n[None, :]

    # Pass 1: the state entering every chunk, in the direction's order.
    state = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        tl.store(work_base + chunk * BLOCK_E * BLOCK_N + work_tile, state)
        positions, valid = _chunk_positions(chunk, rows, length, direction, CH)
        tile_mask = valid[:, None] & e_mask[None, :]
        u = tl.load(u_base + positions[:, None] * su_t + e[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        delta = tl.load(delta_base + positions[:, None] * sd_t + e[None, :], mask=tile_mask,
                        other=0.0).to(tl.float32)
        B = tl.load(B_base + positions[:, None] * sB_t + n[None, :], mask=valid[:, None] & n_mask[None, :],
                    other=0.0).to(tl.float32)
        states, _ = _chunk_states(state, u, delta, A_log2, B)
        state = _row(states, rows, CH - 1)
    tl.debug_barrier()

    # Pass 2: chunks in reverse, the state gradient scanned backwards from the later chunk's.
    grad_state = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for step in range(N_CHUNKS):
        chunk = N_CHUNKS - 1 - step
        positions, valid = _chunk_positions(chunk, rows, length, direction, CH)
        tile_mask = valid[:, None] & e_mask[None, :]
        state_mask = valid[:, None] & n_mask[None, :]
        u, delta, B, C = _load_chunk(u_base, delta_base, B_base, C_base, positions, valid, e, e_mask, n, n_mask,
                                     su_t, sd_t, sB_t, sC_t)
        dy = 0.5 * tl.load(dout_base + positions[:, None] * sdo_t + e[None, :], mask=tile_mask,
                           other=0.0).to(tl.float32)
        # The step after each row in scan order: one token on in the direction's order.
        next_valid = (chunk * CH + rows + 1) < length
        next_positions = tl.where(direction == 0, positions + 1, positions - 1)
        delta_next = tl.load(delta_base + next_positions[:, None] * sd_t + e[None, :],
                             mask=next_valid[:, None] & e_mask[None, :], other=0.0).to(tl.float32)

        state = tl.load(work_base + chunk * BLOCK_E * BLOCK_N + work_tile)
        states, inflow = _chunk_states(state, u, delta, A_log2, B)
        decay_next = tl.exp2(delta_next[:, :, None] * A_log2[None, :, :])
        # A reverse scan, written as flip, forward scan, flip: the rows sit inside each thread, so the flips are
        # register moves, while reverse=True compiles to about 640 shuffles per step.
        decay_suffix, local = tl.associative_scan((tl.flip(decay_next, 0), tl.flip(dy[:, :, None] * C[:, None, :], 0)),
                                                  0, _linear_recurrence)
        decay_suffix, local = tl.flip(decay_suffix, 0), tl.flip(local, 0)
        grad_states = local + decay_suffix * grad_state[None, :, :]
        grad_state = _row(grad_states, rows, 0)
        decayed = states - inflow  # exp(delta_t A) h_{t-1}

        ddelta = tl.sum(grad_states * (decayed * A[None, :, :] + u[:, :, None] * B[:, None, :]), axis=2)
        du = delta * tl.sum(grad_states * B[:, None, :], axis=2) + D[None, :] * dy
        dB = tl.sum(grad_states * (delta * u)[:, :, None], axis=1)
        dC = tl.sum(dy[:, :, None] * states, axis=1)
        dA += tl.sum(grad_states * decayed * delta[:, :, None], axis=0)
        dD += tl.sum(dy * u, axis=0)

        tl.store(du_base + positions[:, None] * channels + e[None, :], du, mask=tile_mask)
        tl.store(ddelta_base + positions[:, None] * channels + e[None, :], ddelta, mask=tile_mask)
        tl.store(dB_base + positions[:, None] * d_state + n[None, :], dB, mask=state_mask)
        tl.store(dC_base + positions[:, None] * d_state + n[None, :], dC, mask=state_mask)

    tl.store(dA_ptr + (sequence * channels + e[:, None]) * d_state + n[None, :], dA, mask=param_mask)
    tl.store(dD_ptr + sequence * channels + e, dD, mask=e_mask)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------


def unsupported_reason(u, delta, A, B, C, D) -> str | None:
    """Why the fused kernel cannot run these (already shape-checked) inputs, or None if it can."""
    problems = []
    if not (u.is_cuda or _interpreting()):
        problems.append(f"inputs are on {u.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{name} has dtype {tensor.dtype}; the kernel takes float32, bfloat16 or float16")
    if A.shape[-1] > MAX_STATE_DIM:
        problems.append(f"state size {A.shape[-1]} is above {MAX_STATE_DIM}")
    return "; ".join(problems) if problems else None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_config(block_e: int, warps: int) -> dict:
    # One configuration under the interpreter, where every launch is slow.
    return {"BLOCK_E": 16 if _interpreting() else block_e, "num_warps": warps}


def _forward(u, delta, A, B, C, D):
    _, batches, length, channels = u.shape
    d_state = A.shape[-1]
    out = torch.zeros(batches, length, channels, device=u.device, dtype=torch.float32)
    config = _launch_config(FWD_BLOCK_E, FWD_WARPS)
    grid = (triton.cdiv(channels, config["BLOCK_E"]), batches, 2)
    _bi_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, out,
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        D.stride(0), out.stride(0), out.stride(1), length, channels, d_state,
        N_CHUNKS=triton.cdiv(length, CHUNK), CH=CHUNK, BLOCK_N=max(triton.next_power_of_2(d_state), 2), **config)
    return out.to(u.dtype)


def _backward(u, delta, A, B, C, D, dout):
    _, batches, length, channels = u.shape
    d_state = A.shape[-1]
    config = _launch_config(BWD_BLOCK_E, BWD_WARPS)
    block_e, block_n = config["BLOCK_E"], max(triton.next_power_of_2(d_state), 2)
    e_blocks = triton.cdiv(channels, block_e)
    n_chunks = triton.cdiv(length, CHUNK)
    f32 = dict(device=u.device, dtype=torch.float32)
    work = torch.empty(2 * batches * e_blocks * n_chunks * block_e * block_n, **f32)
    du = torch.empty(2, batches, length, channels, **f32)
    ddelta = torch.empty(2, batches, length, channels, **f32)
    dB = torch.empty(e_blocks, 2, batches, length, d_state, **f32)
    dC = torch.empty(e_blocks, 2, batches, length, d_state, **f32)
    dA = torch.empty(2, batches, channels, d_state, **f32)
    dD = torch.empty(2, batches, channels, **f32)
    _bi_scan_bwd_kernel[(e_blocks, batches, 2)](
        u, delta, A, B, C, D, dout, work, du, ddelta, dB, dC, dA, dD,
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        D.stride(0), dout.stride(0), dout.stride(1), batches, length, channels, d_state,
        N_CHUNKS=n_chunks, CH=CHUNK, BLOCK_N=block_n, **config)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(1).to(A.dtype), dB.sum(0).to(B.dtype),
            dC.sum(0).to(C.dtype), dD.sum(1).to(D.dtype))


def _prepared(*tensors):
    return tuple(_last_dim_contiguous(x) for x in tensors)


@torch.library.custom_op("vig_kernels::bi_selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor) -> torch.Tensor:
    with on_device_of(u):
        return _forward(*_prepared(u, delta, A, B, C, D))


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D):
    return u.new_empty(u.shape[1:])


@torch.library.custom_op("vig_kernels::bi_selective_scan_bwd", mutates_args=())
def _scan_bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    """du, ddelta, dA, dB, dC, dD."""
    with on_device_of(u):
        return _backward(*_prepared(u, delta, A, B, C, D, dout))


@_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, dout):
    return tuple(x.new_empty(x.shape) for x in (u, delta, A, B, C, D))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_rule(ctx, dout):
    return _scan_bwd_op(*ctx.saved_tensors, dout)


_scan_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def bi_selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Fused bidirectional selective scan: u, delta ``[2, B, T, E]``, A ``[2, E, N]``, B, C ``[2, B, T, N]``,
    D ``[2, E]`` (index 0 the forward direction, 1 the backward one, both in natural token order); returns
    ``(y_fwd + y_bwd) / 2`` ``[B, T, E]`` in u's dtype. Raises ``ValueError``/``TypeError`` for inputs it cannot
    run."""
    check_inputs(u, delta, A, B, C, D)
    reason = unsupported_reason(u, delta, A, B, C, D)
    if reason is not None:
        raise ValueError(f"bi_selective_scan_triton: {reason}")
    if u.numel() == 0:  # empty batch, sequence or channels: nothing to launch, keep the graph connected
        return u.new_zeros(u.shape[1:]) + sum(x.sum() for x in (u, delta, A, B, C, D)).to(u.dtype) * 0
    return _scan_fwd_op(u, delta, A, B, C, D)


__all__ = ["bi_selective_scan_triton", "unsupported_reason"]
