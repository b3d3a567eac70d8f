"""Fused bidirectional GLA (ViG's token mixer) in Triton: forward and backward, both directions per launch.

Semantics are those of :func:`vig_kernels.bigla.reference.bigla_reference` (``o = (o_fwd + o_bwd) / 2``, the
diagonal in both directions), with one documented difference: the log-space gates are clamped to
``[GATE_MIN, 0]`` (``GATE_MIN = -8`` nats per token) inside the kernels, and their gradient is zero outside
that range. See ``docs/kernels.md`` for the algorithm, the numerics and why the clamp is needed.

Algorithm (per batch element, head and block of value channels):

* The sequence is cut into chunks of ``CHUNK`` = 16 tokens. Inside a chunk the pairwise decays
  ``exp(F_t - F_s)`` are factorised with the reference at half the chunk's gate total, so every rescaled
  operand carries at most ``8 * |g|`` nats. Between chunks two fp32 states carry the forward prefix and the
  backward suffix; every state exponent is ``<= 0``.
* A program owns a *segment* of consecutive chunks. Pass 1 walks the segment backwards and stashes the
  state(s) that flow from the right (the backward-direction state, and in the backward kernel also the
  gradient of the forward state; the part from right of the segment is added once known) in a small
  workspace; pass 2 walks forwards, carries the
  left-flowing states in registers and produces every output of the chunk. Short sequences (and any shape
  with enough (batch, head) pairs to fill the GPU) use one segment per sequence. Long sequences with few
  (batch, head) pairs split into segments whose programs exchange their local states inside the same launch:
  each publishes its summaries after pass 1, waits for the rest of its sequence, folds their states in and
  runs pass 2. One launch forward, one backward, at every length (split sequences also zero-fill one ticket
  and one flag word per program beforehand). The forward fits twice the backward's programs per SM, so a
  forward program may own several consecutive segments of the backward's split where that saves a wave.
* Backward recomputes everything from q, k, v and the gates (plus the tiny segment summaries); the gate
  gradients come from ``q*dq - k*dk`` per direction with one within-chunk cumulative sum and a boundary term
  ``rowsum(S * dS)`` per chunk, so no sequence-long cumulative sum runs across programs.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..backend import on_device_of
from .inputs import check_inputs

GATE_MIN = -8.0
"""Lower clamp of the log-space gates (nats per token) applied inside the fused kernels."""

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

CHUNK = 16  # tokens per chunk step

# Tunables (swept on an H200, see docs/kernels.md).
FWD_WARPS = 4
BWD_WARPS = 4
VALUE_BLOCK = None  # value channels per program (None: min(V, 4096 // K))
NUM_STAGES = None  # software-pipelining depth of the chunk loops (None: Triton's default)
FWD_MAX_REGISTERS = 128  # 4 programs per SM (programs of two segments take 152 registers uncapped)
BWD_MAX_REGISTERS = 168  # 3 backward programs per SM instead of 2, where that turns two waves into one
BWD_PROGRAMS_PER_SM = 2  # what 255 registers per thread and 4 warps allow (3 under the register cap)
FWD_PROGRAMS_PER_SM = 4  # what the forward's register cap (128 per thread) and 4 warps allow
FWD_SEGMENTS_PER_PROGRAM = None  # consecutive segments one forward program owns (None: the plan's choice)
MAX_SEGMENTS = 32
SEGMENT_COST = 0.2  # chunk steps a program spends per segment of its sequence, in the plan's cost model

_LOG2E = tl.constexpr(1.4426950408889634)
_GMIN = tl.constexpr(GATE_MIN)


LAST_LAUNCH: dict = {}
"""The most recent compiled kernel of each kind (``fwd``, ``bwd``): registers, spills, for tuning."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------
# small jit helpers
# ----------------------------------------------------------------------------------------------------------
# The forward kernel holds q, k and the gates as [rows, K // 8, 8] tiles (_load_keys): Triton then
# lays the rows of each group of 8 channels across the lanes of one warp and the groups across warps, so the
# chunk's cumulative sums and totals along rows stay inside a warp (shuffles) instead of crossing warps
# through shared memory and barriers, as they do in a [rows, K] tile. They are flattened to [rows, K] only
# as dot operands. The backward keeps [rows, K] tiles: the same layout there measured 5-16% slower
# (docs/kernels.md, "Grouped key tiles").


@triton.jit
def _seq_base(ptr, i_b, i_h, stride_b, stride_h):
    """Pointer to element [i_b, 0, i_h, 0] of a [B, T, H, D] tensor (64-bit batch offset)."""
    return ptr + i_b.to(tl.int64) * stride_b + i_h * stride_h


@triton.jit
def _load_rows(base, rows, rmask, stride_t, D: tl.constexpr):
    """A [rows, D] tile, in fp32."""
    cols = tl.arange(0, D)
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    return tl.load(ptrs, mask=rmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, rows, rmask, stride_t, x, D: tl.constexpr):
    cols = tl.arange(0, D)
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _key_ptrs(base, rows, stride_t, K: tl.constexpr):
    groups = tl.arange(0, K // 8)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    return base + rows[:, None, None].to(tl.int64) * stride_t + groups


@triton.jit
def _load_keys(base, rows, rmask, stride_t, K: tl.constexpr):
    """A [rows, K // 8, 8] tile of a key-dim tensor, in fp32."""
    return tl.load(_key_ptrs(base, rows, stride_t, K), mask=rmask[:, None, None], other=0.0).to(tl.float32)


@triton.jit
def _clamp_gate(g):
    """Gates clamped to [GATE_MIN, 0] and converted to log2 units (padding rows are 0). A NaN gate stays NaN, as
    torch.clamp keeps it: the default min/max would return the bound and hide a diverged run."""
    clamped = tl.maximum(g, _GMIN, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(clamped, 0.0, propagate_nan=tl.PropagateNan.ALL) * _LOG2E


@triton.jit
def _flat(x, K: tl.constexpr):
    """[rows, K // 8, 8] -> [rows, K] (a dot operand)."""
    return tl.reshape(x, (x.shape[0], K))


@triton.jit
def _channels(x, K: tl.constexpr):
    """[K // 8, 8] -> [K] (per-channel factors of a [K, V] state)."""
    return tl.reshape(x, (K,))


@triton.jit
def _scan_in(acc, WS, GT, i_bh, j, NS: tl.constexpr, K: tl.constexpr, DV: tl.constexpr,
             BV: tl.constexpr, i_v, take):
    """acc <- exp2(GT[j]) * acc + WS[j] where `take`, else acc (masked loads, no memory traffic)."""
    base = (i_bh * NS + j).to(tl.int64)
    rk = tl.arange(0, K)
    # .cg: other programs of this launch wrote these after it started, so they must not come from L1
    g = tl.load(GT + base * K + rk, mask=(rk < K) & take, other=0.0, cache_modifier=".cg")
    h = tl.load(WS + base * (K * DV) + rk[:, None] * DV + i_v * BV + tl.arange(0, BV)[None, :],
                mask=(rk[:, None] < K) & take, other=0.0, cache_modifier=".cg")
    return acc * tl.exp2(g)[:, None] + h


# ----------------------------------------------------------------------------------------------------------
# segments of one sequence in one launch
# ----------------------------------------------------------------------------------------------------------
# A split sequence runs as a group of NS programs. Each first computes its segment's local states (pass 1),
# publishes them with a release flag, then waits for the flags of the rest of its group and folds their
# states in. Waiting needs every program of a group to be resident or finished: programs take their group
# and segment from a ticket counter in the order they start, so the groups before a waiting program are all
# started and never wait on later ones. In the interpreter, which runs programs one after another, the
# launcher runs the publishing half (PHASE 1) and the consuming half (PHASE 2) as two launches instead.


@triton.jit
def _coords(SYNC, H, NS: tl.constexpr, NV: tl.constexpr, SUB: tl.constexpr, PHASE: tl.constexpr):
    """This program's batch, head, batch*head, its index among the NS // SUB programs of its group (the
    programs of one sequence and value block, each owning SUB consecutive segments), value block, group and
    workspace slot. Split sequences take them from a ticket."""
    if NS > 1 and PHASE == 0:
        t = tl.atomic_add(SYNC, 1)
    else:
        t = tl.program_id(0)
    group = t // (NS // SUB)
    i_bh = group // NV
    i_p = t % (NS // SUB)
    i_v = group % NV
    slot = (i_p * (tl.num_programs(0) // ((NS // SUB) * NV)) + i_bh) * NV + i_v
    return i_bh // H, i_bh % H, i_bh, i_p, i_v, group, slot


@triton.jit
def _publish(SYNC, group, i_s, NS: tl.constexpr):
    tl.debug_barrier()  # every thread's summary stores precede the release
    tl.atomic_xchg(SYNC + 1 + group * NS + i_s, 1, sem="release", scope="gpu")


@triton.jit
def _wait_for_group(SYNC, group, NS: tl.constexpr):
    for j in range(0, NS):
        while tl.atomic_add(SYNC + 1 + group * NS + j, 0, sem="acquire", scope="gpu") == 0:
            pass
    tl.debug_barrier()


@triton.jit
def _fold_in(st_ptr, suf_ptr, state, CPS: tl.constexpr, STEP: tl.constexpr, K: tl.constexpr,
             BV: tl.constexpr):
    """stash[c] += exp2(suffix[c]) * state for every chunk c: adds a state entering the segment from the right
    to the local states pass 1 stashed (suffix[c]: the segment's gate total right of chunk c, log2 units)."""
    rk = tl.arange(0, K)
    st_off = rk[:, None] * BV + tl.arange(0, BV)[None, :]
    for c in range(0, CPS):
        ptrs = st_ptr + c * STEP + st_off
        decay = tl.exp2(tl.load(suf_ptr + c * K + rk))
        tl.store(ptrs, (tl.load(ptrs).to(tl.float32) + decay[:, None] * state).to(ptrs.dtype.element_ty))
    tl.debug_barrier()


@triton.jit
def _reverse_sums(g2, total):
    """Inclusive reverse cumulative sums over the rows, from the rows' total (which the callers need anyway): a
    reverse tl.cumsum costs 36-40 more shuffles per chunk step."""
    return total[None] - tl.cumsum(g2, axis=0) + g2


@triton.jit
def _store_gate_sums(gs_base, gs_off, gf_raw, gb_raw, BT: tl.constexpr, K: tl.constexpr):
    """The backward's chunk 0: its inclusive gate sums, forward F and reverse R (log2 units), as pass 1 stores
    the other chunks'."""
    gf2 = _clamp_gate(gf_raw)
    gb2 = _clamp_gate(gb_raw)
    tl.store(gs_base + gs_off, tl.cumsum(gf2, axis=0))
    tl.store(gs_base + BT * K + gs_off, _reverse_sums(gb2, tl.sum(gb2, axis=0)))


@triton.jit
def _store_summary(WS, GT, i_bh, i_s, i_v, h, gsum, NS: tl.constexpr, K: tl.constexpr, DV: tl.constexpr,
                   BV: tl.constexpr, STORE_GT: tl.constexpr):
    base = (i_bh * NS + i_s).to(tl.int64)
    rk = tl.arange(0, K)
    tl.store(WS + base * (K * DV) + rk[:, None] * DV + i_v * BV + tl.arange(0, BV)[None, :], h)
    if STORE_GT:  # every value block stores the same totals, so each group reads totals its own flags cover
        tl.store(GT + base * K + rk, _channels(gsum, K))


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(Q, Kp, V, GF, GB, O, STASH, SUF, HF, HB, GTF, GTB, SYNC,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                sf_b, sf_t, sf_h, sg_b, sg_t, sg_h, so_b, so_t, so_h,
                T, H, qscale,
                K: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                NS: tl.constexpr, CPS: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                PHASE: tl.constexpr):
    # A program owns SUB consecutive segments (the forward fits twice the backward's programs per SM, so it
    # may want fewer, longer programs); it publishes the summaries of each, so the backward sees NS segments.
    i_b, i_h, i_bh, i_p, i_v, group, slot = _coords(SYNC, H, NS, DV // BV, SUB, PHASE)
    q_base = _seq_base(Q, i_b, i_h, sq_b, sq_h)
    k_base = _seq_base(Kp, i_b, i_h, sk_b, sk_h)
    v_base = _seq_base(V, i_b, i_h, sv_b, sv_h) + i_v * BV
    gf_base = _seq_base(GF, i_b, i_h, sf_b, sf_h)
    gb_base = _seq_base(GB, i_b, i_h, sg_b, sg_h)
    o_base = _seq_base(O, i_b, i_h, so_b, so_h) + i_v * BV
    st_base = STASH + (slot * SUB * CPS).to(tl.int64) * (K * BV)
    suf_base = SUF + (slot * SUB * CPS).to(tl.int64) * K
    st_off = tl.arange(0, K)[:, None] * BV + tl.arange(0, BV)[None, :]
    rk = tl.arange(0, K)

    if PHASE != 2:
        # pass 1, right to left: stash the segment-local backward state entering each chunk from its right.
        # A split sequence also needs chunk 0, for the segment's summaries: its local key states h^f, h^b
        # and gate totals, and the gate total right of each chunk (to fold in the state from the right).
        for u in tl.static_range(SUB):
            seg = SUB - 1 - u  # the program's segments, right to left
            i_s = i_p * SUB + seg
            seg_st = st_base + (seg * CPS) * (K * BV)
            seg_suf = suf_base + (seg * CPS) * K
            s_b = tl.zeros([K, BV], dtype=tl.float32)
            tl.store(seg_st + (CPS - 1) * (K * BV) + st_off, s_b.to(DOT))
            if NS > 1:
                h_f = tl.zeros([K, BV], dtype=tl.float32)
                suf_f = tl.zeros([K // 8, 8], dtype=tl.float32)
                suf_b = tl.zeros([K // 8, 8], dtype=tl.float32)
                tl.store(seg_suf + (CPS - 1) * K + rk, _channels(suf_b, K))
            for jj in range(0, CPS if NS > 1 else CPS - 1):
                cc = CPS - 1 - jj
                rows = (i_s * CPS + cc) * BT + tl.arange(0, BT)
                rmask = rows < T
                k = _load_keys(k_base, rows, rmask, sk_t, K)
                v = _load_rows(v_base, rows, rmask, sv_t, BV).to(DOT)
                gb2 = _clamp_gate(_load_keys(gb_base, rows, rmask, sg_t, K))
                Gb = tl.sum(gb2, axis=0)
                kd = _flat(k * tl.exp2(Gb[None] - _reverse_sums(gb2, Gb)), K).to(DOT)
                s_b = s_b * tl.exp2(_channels(Gb, K))[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)
                if NS > 1:
                    gf2 = _clamp_gate(_load_keys(gf_base, rows, rmask, sf_t, K))
                    Gf = tl.sum(gf2, axis=0)
                    kf = _flat(k * tl.exp2(suf_f[None] + Gf[None] - tl.cumsum(gf2, axis=0)), K).to(DOT)
                    h_f += tl.dot(tl.trans(kf), v, input_precision=PREC)
                    suf_f += Gf
                    suf_b += Gb
                    tl.store(seg_suf + (cc - 1) * K + rk, _channels(suf_b, K), mask=(rk < K) & (cc > 0))
                    tl.store(seg_st + (cc - 1) * (K * BV) + st_off, s_b.to(DOT), mask=(st_off >= 0) & (cc > 0))
                else:  # unsplit, chunk 0 never comes: no mask on the hot path
                    tl.store(seg_st + (cc - 1) * (K * BV) + st_off, s_b.to(DOT))
            if NS > 1:
                _store_summary(HF, GTF, i_bh, i_s, i_v, h_f, suf_f, NS, K, DV, BV, True)
                _store_summary(HB, GTB, i_bh, i_s, i_v, s_b, suf_b, NS, K, DV, BV, True)
        if NS > 1:
            _publish(SYNC, group, i_p, NS // SUB)
    tl.debug_barrier()

    if PHASE != 1:
        # states entering the program's segments: forward prefix from the left, backward suffix from the right
        s_f = tl.zeros([K, BV], dtype=tl.float32)
        if NS > 1:
            _wait_for_group(SYNC, group, NS // SUB)
            first = i_p * SUB
            s_b = tl.zeros([K, BV], dtype=tl.float32)
            for j in range(0, NS):
                s_f = _scan_in(s_f, HF, GTF, i_bh, j, NS, K, DV, BV, i_v, j < first)
                jr = NS - 1 - j
                s_b = _scan_in(s_b, HB, GTB, i_bh, jr, NS, K, DV, BV, i_v, jr >= first + SUB)
            for u in tl.static_range(SUB):
                seg = SUB - 1 - u
                if u > 0:  # the state entering this segment from the right crosses the segment right of it
                    s_b = _scan_in(s_b, HB, GTB, i_bh, first + seg + 1, NS, K, DV, BV, i_v, True)
                _fold_in(st_base + (seg * CPS) * (K * BV), suf_base + (seg * CPS) * K, s_b, CPS, K * BV, K, BV)

        # pass 2, left to right over all the program's chunks: everything else
        r_loc = tl.arange(0, BT)
        lower = r_loc[None, :] <= r_loc[:, None]
        upper = r_loc[None, :] >= r_loc[:, None]
        for cc in range(0, SUB * CPS):
            rows = (i_p * SUB * CPS + cc) * BT + r_loc
            rmask = rows < T
            q = _load_keys(q_base, rows, rmask, sq_t, K) * qscale
            k = _load_keys(k_base, rows, rmask, sk_t, K)
            v = _load_rows(v_base, rows, rmask, sv_t, BV).to(DOT)
            gf2 = _clamp_gate(_load_keys(gf_base, rows, rmask, sf_t, K))
            F = tl.cumsum(gf2, axis=0)
            Gf = tl.sum(gf2, axis=0)
            gb2 = _clamp_gate(_load_keys(gb_base, rows, rmask, sg_t, K))
            Gb = tl.sum(gb2, axis=0)
            R = _reverse_sums(gb2, Gb)
            fm = 0.5 * Gf[None]  # the reference: half the chunk total (F, R lie in [G, 0])
            rm = 0.5 * Gb[None]
            qf = q * tl.exp2(F - fm)
            kf = k * tl.exp2(fm - F)
            qb = q * tl.exp2(R - rm)
            kb = k * tl.exp2(rm - R)

            a = tl.dot(_flat(qf, K).to(DOT), tl.trans(_flat(kf, K).to(DOT)), input_precision=PREC)
            w = tl.where(lower, a, 0.0)
            a = tl.dot(_flat(qb, K).to(DOT), tl.trans(_flat(kb, K).to(DOT)), input_precision=PREC)
            w += tl.where(upper, a, 0.0)

            acc = tl.dot(w.to(DOT), v, input_precision=PREC)
            acc += tl.dot(_flat(qf * tl.exp2(fm), K).to(DOT), s_f.to(DOT), input_precision=PREC)
            s_bn = tl.load(st_base + cc * (K * BV) + st_off)
            acc += tl.dot(_flat(qb * tl.exp2(rm), K).to(DOT), s_bn, input_precision=PREC)
            _store_rows(o_base, rows, rmask, so_t, acc, BV)

            kd = _flat(kf * tl.exp2(Gf[None] - fm), K).to(DOT)
            s_f = s_f * tl.exp2(_channels(Gf, K))[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_kernel(Q, Kp, V, GF, GB, DO, DQ, DK, DVp, DGF, DGB, STASH, GSUM, SUF, HF, HB, DSF, DSB, GTF, GTB, SYNC,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                sf_b, sf_t, sf_h, sg_b, sg_t, sg_h, sd_b, sd_t, sd_h,
                sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
                sdf_b, sdf_t, sdf_h, sdg_b, sdg_t, sdg_h, part_stride,
                T, H, qscale,
                K: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                NS: tl.constexpr, CPS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                PHASE: tl.constexpr, CAPPED: tl.constexpr):
    i_b, i_h, i_bh, i_s, i_v, group, slot = _coords(SYNC, H, NS, DV // BV, 1, PHASE)
    q_base = _seq_base(Q, i_b, i_h, sq_b, sq_h)
    k_base = _seq_base(Kp, i_b, i_h, sk_b, sk_h)
    v_base = _seq_base(V, i_b, i_h, sv_b, sv_h) + i_v * BV
    gf_base = _seq_base(GF, i_b, i_h, sf_b, sf_h)
    gb_base = _seq_base(GB, i_b, i_h, sg_b, sg_h)
    do_base = _seq_base(DO, i_b, i_h, sd_b, sd_h) + i_v * BV
    part = i_v.to(tl.int64) * part_stride  # dq, dk, dg are per-value-block partials when NV > 1
    dq_base = _seq_base(DQ, i_b, i_h, sdq_b, sdq_h) + part
    dk_base = _seq_base(DK, i_b, i_h, sdk_b, sdk_h) + part
    dv_base = _seq_base(DVp, i_b, i_h, sdv_b, sdv_h) + i_v * BV
    dgf_base = _seq_base(DGF, i_b, i_h, sdf_b, sdf_h) + part
    dgb_base = _seq_base(DGB, i_b, i_h, sdg_b, sdg_h) + part
    st_base = STASH + (slot * CPS * 2).to(tl.int64) * (K * BV)
    gs_base = GSUM + (slot * CPS * 2).to(tl.int64) * (BT * K)
    suf_base = SUF + (slot * CPS).to(tl.int64) * K
    st_off = tl.arange(0, K)[:, None] * BV + tl.arange(0, BV)[None, :]
    gs_off = tl.arange(0, BT)[:, None] * K + tl.arange(0, K)[None, :]
    rk = tl.arange(0, K)

    if PHASE != 2:
        # pass 1, right to left: stash for every chunk the backward key state from its right (complete: the
        # forward pass's summaries give the part from right of the segment) and the segment-local forward
        # query-gradient state from its right. A split sequence also needs chunk 0, for the segment's
        # query-gradient summaries and the forward gate total right of each chunk.
        s_b = tl.zeros([K, BV], dtype=tl.float32)
        ds_f = tl.zeros([K, BV], dtype=tl.float32)
        if NS > 1:
            for j in range(0, NS):
                jr = NS - 1 - j
                s_b = _scan_in(s_b, HB, GTB, i_bh, jr, NS, K, DV, BV, i_v, jr > i_s)
            ds_b = tl.zeros([K, BV], dtype=tl.float32)
            suf_f = tl.zeros([K], dtype=tl.float32)
            suf_b = tl.zeros([K], dtype=tl.float32)
            tl.store(suf_base + (CPS - 1) * K + rk, suf_f)
        tl.store(st_base + ((CPS - 1) * 2) * (K * BV) + st_off, s_b.to(DOT))
        tl.store(st_base + ((CPS - 1) * 2 + 1) * (K * BV) + st_off, ds_f.to(DOT))
        for jj in range(0, CPS if NS > 1 else CPS - 1):
            cc = CPS - 1 - jj
            rows = (i_s * CPS + cc) * BT + tl.arange(0, BT)
            rmask = rows < T
            q = _load_rows(q_base, rows, rmask, sq_t, K) * qscale
            k = _load_rows(k_base, rows, rmask, sk_t, K)
            v = _load_rows(v_base, rows, rmask, sv_t, BV).to(DOT)
            do = _load_rows(do_base, rows, rmask, sd_t, BV).to(DOT)
            gf2 = _clamp_gate(_load_rows(gf_base, rows, rmask, sf_t, K))
            gb2 = _clamp_gate(_load_rows(gb_base, rows, rmask, sg_t, K))
            F = tl.cumsum(gf2, axis=0)
            Gf = tl.sum(gf2, axis=0)
            Gb = tl.sum(gb2, axis=0)
            R = _reverse_sums(gb2, Gb)
            if NS == 1:
                tl.store(gs_base + (cc * 2) * (BT * K) + gs_off, F)
                tl.store(gs_base + (cc * 2 + 1) * (BT * K) + gs_off, R)
            kd = (k * tl.exp2(Gb[None, :] - R)).to(DOT)
            s_b = s_b * tl.exp2(Gb)[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)
            qd = (q * tl.exp2(F)).to(DOT)
            ds_f = ds_f * tl.exp2(Gf)[:, None] + tl.dot(tl.trans(qd), do, input_precision=PREC)
            if NS > 1:
                qb = (q * tl.exp2(suf_b[None, :] + R)).to(DOT)
                ds_b += tl.dot(tl.trans(qb), do, input_precision=PREC)
                suf_f += Gf
                suf_b += Gb
                keep = (st_off >= 0) & (cc > 0)
                tl.store(suf_base + (cc - 1) * K + rk, suf_f, mask=(rk < K) & (cc > 0))
                tl.store(st_base + ((cc - 1) * 2) * (K * BV) + st_off, s_b.to(DOT), mask=keep)
                tl.store(st_base + ((cc - 1) * 2 + 1) * (K * BV) + st_off, ds_f.to(DOT), mask=keep)
            else:  # unsplit, chunk 0 never comes: no mask on the hot path
                tl.store(st_base + ((cc - 1) * 2) * (K * BV) + st_off, s_b.to(DOT))
                tl.store(st_base + ((cc - 1) * 2 + 1) * (K * BV) + st_off, ds_f.to(DOT))
        if NS == 1:  # pass 1 stopped short of chunk 0; pass 2 still wants its gate sums
            rows = tl.arange(0, BT)
            _store_gate_sums(gs_base, gs_off, _load_rows(gf_base, rows, rows < T, sf_t, K),
                             _load_rows(gb_base, rows, rows < T, sg_t, K), BT, K)
        if NS > 1:
            _store_summary(DSF, GTF, i_bh, i_s, i_v, ds_f, suf_f, NS, K, DV, BV, False)
            _store_summary(DSB, GTB, i_bh, i_s, i_v, ds_b, suf_b, NS, K, DV, BV, False)
            _publish(SYNC, group, i_s, NS)
    tl.debug_barrier()

    if PHASE != 1:
        # s_f: keys left of the segment; ds_b: queries left of it; the query gradients right of it are
        # folded into the stash
        s_f = tl.zeros([K, BV], dtype=tl.float32)
        ds_b = tl.zeros([K, BV], dtype=tl.float32)
        if NS > 1:
            _wait_for_group(SYNC, group, NS)
            ds_f = tl.zeros([K, BV], dtype=tl.float32)
            for j in range(0, NS):
                s_f = _scan_in(s_f, HF, GTF, i_bh, j, NS, K, DV, BV, i_v, j < i_s)
                ds_b = _scan_in(ds_b, DSB, GTB, i_bh, j, NS, K, DV, BV, i_v, j < i_s)
                jr = NS - 1 - j
                ds_f = _scan_in(ds_f, DSF, GTF, i_bh, jr, NS, K, DV, BV, i_v, jr > i_s)
            _fold_in(st_base + K * BV, suf_base, ds_f, CPS, 2 * K * BV, K, BV)

        r_loc = tl.arange(0, BT)
        lower = r_loc[None, :] <= r_loc[:, None]
        upper = r_loc[None, :] >= r_loc[:, None]
        strict_lower = r_loc[None, :] < r_loc[:, None]
        strict_upper = r_loc[None, :] > r_loc[:, None]
        for cc in range(0, CPS):
            rows = (i_s * CPS + cc) * BT + r_loc
            rmask = rows < T
            q = _load_rows(q_base, rows, rmask, sq_t, K) * qscale
            k = _load_rows(k_base, rows, rmask, sk_t, K)
            v = _load_rows(v_base, rows, rmask, sv_t, BV).to(DOT)
            do = _load_rows(do_base, rows, rmask, sd_t, BV).to(DOT)
            gf_raw = _load_rows(gf_base, rows, rmask, sf_t, K)
            gb_raw = _load_rows(gb_base, rows, rmask, sg_t, K)
            # Unsplit, the chunk's gate sums come from pass 1's workspace (recomputing them was 2.5-3.7% slower fwd+bwd
            # at 196 tokens on an H100); split, pass 2 recomputes them (0.6-2.6% faster, and no workspace).
            # A padding row's gate is 0, so F's last row and R's first are the chunk totals; read as a [1, K] row
            # summed over its one row, they get the layout of a row sum of the tile (as [K] vectors they spilled).
            if NS == 1:
                F = tl.load(gs_base + (cc * 2) * (BT * K) + gs_off)
                R = tl.load(gs_base + (cc * 2 + 1) * (BT * K) + gs_off)
                Gf = tl.sum(tl.load(gs_base + (cc * 2) * (BT * K) + (BT - 1) * K + rk[None, :]), axis=0)
                Gb = tl.sum(tl.load(gs_base + (cc * 2 + 1) * (BT * K) + rk[None, :]), axis=0)
            else:
                gf2 = _clamp_gate(gf_raw)
                gb2 = _clamp_gate(gb_raw)
                F = tl.cumsum(gf2, axis=0)
                Gf = tl.sum(gf2, axis=0)
                Gb = tl.sum(gb2, axis=0)
                R = _reverse_sums(gb2, Gb)
            fm = 0.5 * Gf[None, :]
            rm = 0.5 * Gb[None, :]
            eqf = tl.exp2(F - fm)
            ekf = tl.exp2(fm - F)
            eqb = tl.exp2(R - rm)
            ekb = tl.exp2(rm - R)
            qf_d = (q * eqf).to(DOT)
            kf_d = (k * ekf).to(DOT)
            qb_d = (q * eqb).to(DOT)
            kb_d = (k * ekb).to(DOT)

            dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # dp[t, s] = do_t . v_s
            # The diagonal (weight 2 q~_t.k_t, q~ = q * scale / 2) cancels exactly in q*dq - k*dk: keep it out of
            # the per-direction parts and add it to dq, dk at the end (with 16-bit operands its rounding
            # noise would otherwise dominate the gate gradients). do_t.v_t is read off the diagonal of dp: a row sum
            # of fp32 copies of do and v kept both tiles live and made the backward spill (fwd+bwd 13-20% faster
            # this way on an H100).
            dp_diag = 2.0 * tl.sum(tl.where(r_loc[None, :] == r_loc[:, None], dp, 0.0), axis=1)
            w = tl.where(lower, tl.dot(qf_d, tl.trans(kf_d), input_precision=PREC), 0.0)
            w += tl.where(upper, tl.dot(qb_d, tl.trans(kb_d), input_precision=PREC), 0.0)
            da_f = tl.where(strict_lower, dp, 0.0).to(DOT)
            da_b = tl.where(strict_upper, dp, 0.0).to(DOT)
            dv = tl.dot(tl.trans(w.to(DOT)), do, input_precision=PREC)

            # Gate gradients: dg^f_r = sum_{t >= r} (q dq^f - k dk^f)_t, dg^b_r = sum_{t <= r} (q dq^b - k dk^b)_t,
            # split at the chunk end into a within-chunk sum and a boundary term rowsum(S * dS) taken with the
            # state updated to the chunk end. Two schedules of the same math: under the register cap one direction
            # at a time, so that one direction's tiles die before the other's are built (fewer spills: fwd+bwd
            # 3.4% and 5.0% faster at ViG-T 196/128 and ViG-B 1024/32 on an H100); uncapped both directions
            # together, which is 2-3.6% faster there (benchmarks/results/bigla_h100_backward_schedules_ab.md).
            diag = dp_diag[:, None]
            if CAPPED:
                ds_fc = tl.load(st_base + (cc * 2 + 1) * (K * BV) + st_off)   # queries right of the chunk
                ekdf = ekf * tl.exp2(Gf[None, :] - fm)  # exp(Gf - F) <= 1
                dqf = (tl.dot(da_f, kf_d, input_precision=PREC)
                       + tl.dot(do, tl.trans(s_f.to(DOT)), input_precision=PREC) * tl.exp2(fm)) * eqf
                dkf = (tl.dot(tl.trans(da_f), qf_d, input_precision=PREC) * ekf
                       + tl.dot(v, tl.trans(ds_fc), input_precision=PREC) * ekdf)
                kfd_d = (k * ekdf).to(DOT)
                dv += tl.dot(kfd_d, ds_fc, input_precision=PREC)
                s_f = s_f * tl.exp2(Gf)[:, None] + tl.dot(tl.trans(kfd_d), v, input_precision=PREC)
                dgf = tl.sum(s_f * ds_fc.to(tl.float32), axis=1)[None, :] + tl.cumsum(q * dqf - k * dkf, axis=0,
                                                                                      reverse=True)
                _store_rows(dgf_base, rows, rmask, sdf_t, tl.where((gf_raw >= _GMIN) & (gf_raw <= 0.0), dgf, 0.0), K)
                dq = dqf + diag * k
                dk = dkf + diag * q

                s_bn = tl.load(st_base + (cc * 2) * (K * BV) + st_off)        # keys right of the chunk
                er = tl.exp2(rm)
                ekdb = ekb * tl.exp2(Gb[None, :] - rm)  # exp(Gb - R) <= 1
                dqb = (tl.dot(da_b, kb_d, input_precision=PREC)
                       + tl.dot(do, tl.trans(s_bn), input_precision=PREC) * er) * eqb
                dkb = (tl.dot(tl.trans(da_b), qb_d, input_precision=PREC) * ekb
                       + tl.dot(v, tl.trans(ds_b.to(DOT)), input_precision=PREC) * ekdb)
                dv += tl.dot((k * ekdb).to(DOT), ds_b.to(DOT), input_precision=PREC)
                ds_b = ds_b * tl.exp2(Gb)[:, None] + tl.dot(tl.trans((q * eqb * er).to(DOT)), do,
                                                            input_precision=PREC)
                d_b = q * dqb - k * dkb
                dgb = tl.sum(s_bn.to(tl.float32) * ds_b, axis=1)[None, :] - (tl.cumsum(d_b, axis=0, reverse=True)
                                                                              - d_b)
                _store_rows(dgb_base, rows, rmask, sdg_t, tl.where((gb_raw >= _GMIN) & (gb_raw <= 0.0), dgb, 0.0), K)
                _store_rows(dq_base, rows, rmask, sdq_t, (dq + dqb) * qscale, K)
                _store_rows(dk_base, rows, rmask, sdk_t, dk + dkb, K)
                _store_rows(dv_base, rows, rmask, sdv_t, dv, BV)
            else:
                s_bn = tl.load(st_base + (cc * 2) * (K * BV) + st_off)        # keys right of the chunk
                ds_fc = tl.load(st_base + (cc * 2 + 1) * (K * BV) + st_off)   # queries right of the chunk
                ef = tl.exp2(fm)
                er = tl.exp2(rm)
                ekdf = ekf * tl.exp2(Gf[None, :] - fm)  # exp(Gf - F) <= 1
                ekdb = ekb * tl.exp2(Gb[None, :] - rm)  # exp(Gb - R) <= 1
                kfd = k * ekdf
                kbd = k * ekdb
                dqf = (tl.dot(da_f, kf_d, input_precision=PREC)
                       + tl.dot(do, tl.trans(s_f.to(DOT)), input_precision=PREC) * ef) * eqf
                dqb = (tl.dot(da_b, kb_d, input_precision=PREC)
                       + tl.dot(do, tl.trans(s_bn), input_precision=PREC) * er) * eqb
                dkf = (tl.dot(tl.trans(da_f), qf_d, input_precision=PREC) * ekf
                       + tl.dot(v, tl.trans(ds_fc), input_precision=PREC) * ekdf)
                dkb = (tl.dot(tl.trans(da_b), qb_d, input_precision=PREC) * ekb
                       + tl.dot(v, tl.trans(ds_b.to(DOT)), input_precision=PREC) * ekdb)
                kfd_d = kfd.to(DOT)
                dv += tl.dot(kfd_d, ds_fc, input_precision=PREC)
                dv += tl.dot(kbd.to(DOT), ds_b.to(DOT), input_precision=PREC)

                _store_rows(dq_base, rows, rmask, sdq_t, (dqf + dqb + diag * k) * qscale, K)
                _store_rows(dk_base, rows, rmask, sdk_t, dkf + dkb + diag * q, K)
                _store_rows(dv_base, rows, rmask, sdv_t, dv, BV)

                # state updates (after them: s_f holds keys up to the chunk end, ds_b queries up to the chunk end)
                s_f = s_f * tl.exp2(Gf)[:, None] + tl.dot(tl.trans(kfd_d), v, input_precision=PREC)
                ds_b = ds_b * tl.exp2(Gb)[:, None] + tl.dot(tl.trans((q * eqb * er).to(DOT)), do,
                                                            input_precision=PREC)

                d_f = q * dqf - k * dkf
                d_b = q * dqb - k * dkb
                bf = tl.sum(s_f * ds_fc.to(tl.float32), axis=1)
                bb = tl.sum(s_bn.to(tl.float32) * ds_b, axis=1)
                dgf = bf[None, :] + tl.cumsum(d_f, axis=0, reverse=True)
                dgb = bb[None, :] - (tl.cumsum(d_b, axis=0, reverse=True) - d_b)
                dgf = tl.where((gf_raw >= _GMIN) & (gf_raw <= 0.0), dgf, 0.0)
                dgb = tl.where((gb_raw >= _GMIN) & (gb_raw <= 0.0), dgb, 0.0)
                _store_rows(dgf_base, rows, rmask, sdf_t, dgf, K)
                _store_rows(dgb_base, rows, rmask, sdg_t, dgb, K)

# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------


def unsupported_reason(q, k, v, g_fwd, g_bwd) -> str | None:
    """Why the fused kernel cannot run these (already shape-checked) inputs, or None if it can."""
    problems = []
    if not (q.is_cuda or _interpreting()):
        problems.append(f"inputs are on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    if q.dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {q.dtype} is not supported (q, k, v must be float32, bfloat16 or float16)")
    elif _interpreting() and q.dtype != torch.float32:
        problems.append(f"dtype {q.dtype} under TRITON_INTERPRET=1: the interpreter computes 16-bit dots wrongly, "
                        "use float32 there")
    elif k.dtype != q.dtype or v.dtype != q.dtype:
        problems.append(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, g in (("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        if g.dtype not in SUPPORTED_GATE_DTYPES:
            problems.append(f"{name} has dtype {g.dtype}; gates must be float32, bfloat16 or float16")
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if key_dim not in SUPPORTED_HEAD_DIMS:
        problems.append(f"key head dim {key_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    if value_dim not in SUPPORTED_HEAD_DIMS:
        problems.append(f"value head dim {value_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    return "; ".join(problems) if problems else None


def _launch(name, kernel, grid, *args, max_registers=None, **kwargs):
    """Launch, retrying without software pipelining if the kernel does not fit in shared memory."""
    if NUM_STAGES:
        kwargs.setdefault("num_stages", NUM_STAGES)
    if max_registers and not _interpreting():
        kwargs["maxnreg"] = max_registers
    try:
        LAST_LAUNCH[name] = kernel[grid](*args, **kwargs)
    except triton.runtime.errors.OutOfResources:
        kwargs["num_stages"] = 1
        LAST_LAUNCH[name] = kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _plan(batch_heads: int, length: int, key_dim: int, value_dim: int, device: torch.device,
          segments: int | None = None):
    """Chunk size, value-block width, the split of each sequence into segments, chunks per segment and how
    many consecutive segments one forward program owns.

    The split minimises ``backward waves x (chunks per segment + SEGMENT_COST x segments)``: each program's
    chain of chunk steps is the time of one wave of the backward (the larger kernel), and a program also
    folds in the states of every other segment of its sequence. Fitted to a sweep of 1 to 32 segments at
    nine ViG shapes on an H200 (docs/kernels.md), where it picks the fastest split at eight and, at the
    ninth, one 0.7% slower (0.5% on a re-run). The forward fits twice the programs per SM; it then runs
    fewer, longer programs where that saves a wave (``_forward_group``)."""
    bt = CHUNK
    bv = min(value_dim, VALUE_BLOCK or max(16, 4096 // key_dim))
    nv = value_dim // bv
    n_chunks = triton.cdiv(length, bt)
    if segments is None:
        def cost(split):
            cps = triton.cdiv(n_chunks, split)
            ns = triton.cdiv(n_chunks, cps)
            return _backward_waves(batch_heads * nv * ns, ns, device) * (cps + SEGMENT_COST * ns)

        segments = min(range(1, max(1, min(MAX_SEGMENTS, n_chunks // 2)) + 1), key=cost)
    cps = triton.cdiv(n_chunks, max(1, min(segments, n_chunks)))
    ns = triton.cdiv(n_chunks, cps)
    return bt, bv, nv, ns, cps, _forward_group(batch_heads * nv * ns, ns, cps, device)


def _forward_group(programs: int, ns: int, cps: int, device: torch.device) -> int:
    """Segments per forward program, a divisor of ns: the one that minimises ``forward waves x (chunks per
    program + SEGMENT_COST x segments)``, the fewest on ties. The backward's split leaves the forward, at 4
    programs per SM, a second, partly filled wave at some shapes (ViG-B at 4096 tokens: 768 programs for 528
    places); programs of two segments each then run in one."""
    if FWD_SEGMENTS_PER_PROGRAM is not None:
        if ns % FWD_SEGMENTS_PER_PROGRAM:
            raise ValueError(f"FWD_SEGMENTS_PER_PROGRAM={FWD_SEGMENTS_PER_PROGRAM} does not divide the plan's {ns} "
                             "segments")
        return FWD_SEGMENTS_PER_PROGRAM
    places = FWD_PROGRAMS_PER_SM * _sm_count(device)

    def cost(group):
        return triton.cdiv(programs // group, places) * (group * cps + SEGMENT_COST * ns)

    return min((group for group in range(1, ns + 1) if ns % group == 0), key=cost)


@contextlib.contextmanager
def forward_segments_per_program(count: int | None):
    """Within the block every forward program owns ``count`` consecutive segments of the split (None: the
    plan's choice), for tests and tuning; the plan raises ValueError where ``count`` does not divide the split."""
    global FWD_SEGMENTS_PER_PROGRAM
    previous, FWD_SEGMENTS_PER_PROGRAM = FWD_SEGMENTS_PER_PROGRAM, count
    try:
        yield
    finally:
        FWD_SEGMENTS_PER_PROGRAM = previous


def _backward_waves(programs: int, segments: int, device: torch.device) -> int:
    per_sm = BWD_PROGRAMS_PER_SM + (1 if _cap_backward(programs, segments, device) else 0)
    return triton.cdiv(programs, per_sm * _sm_count(device))


def _cap_backward(programs: int, segments: int, device: torch.device) -> bool:
    """Whether to cap the backward's registers: uncapped it takes 255 registers (2 programs per SM), capped at
    168 it spills but fits 3. Measured on an H200 with the v3 kernels (docs/kernels.md): 6-7% faster when that
    turns two waves into one, 15-16% slower when the grid runs in several waves anyway and 24% on the segmented
    path. With the current kernels on an H100, 8-9% faster at the one-wave shapes."""
    sms = _sm_count(device)
    return segments == 1 and 2 * sms < programs <= 3 * sms


def _dot_types(dtype: torch.dtype):
    if dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return tl.float32, prec, torch.float32
    return tl.bfloat16, "tf32", torch.bfloat16


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _segment_buffers(q, v, plan, n_states):
    """Per-launch workspace: the stash (n_states tiles per chunk), the gate totals right of each chunk and the
    ticket counter and publish flags of split sequences (zeroed: one word each). Returns the number of segments
    of all sequences first: the backward's programs, one per segment (a forward program may own several)."""
    bt, bv, nv, ns, cps, _ = plan
    batch, _, heads, key_dim = q.shape
    programs = batch * heads * nv * ns
    _, _, stash_dtype = _dot_types(q.dtype)
    stash = torch.empty(programs * cps * n_states * key_dim * bv, device=q.device, dtype=stash_dtype)
    if ns == 1:  # no exchange: the kernels never touch the suffix totals or the flags
        return programs, stash, stash, stash
    suffix = torch.empty(programs * cps * key_dim, device=q.device, dtype=torch.float32)
    sync = torch.zeros(1 + programs, device=q.device, dtype=torch.int32)
    return programs, stash, suffix, sync


def _summary_buffers(q, v, plan, with_totals):
    """Two [B*H, segments, K, V] states and, with_totals, two [B*H, segments, K] gate totals."""
    state, _, total, _ = _summary_shapes(q, v, plan)
    shapes = (state, state, total, total) if with_totals else (state, state)
    return tuple(torch.empty(shape, device=q.device, dtype=torch.float32) for shape in shapes)


def _phases(ns: int):
    """PHASE 0 runs a split sequence's segments in one launch; the interpreter, which runs programs one after
    another, cannot wait inside a launch, so it publishes (1) and consumes (2) in two."""
    return (1, 2) if ns > 1 and _interpreting() else (0,)


def _forward(q, k, v, g_fwd, g_bwd, scale, plan):
    bt, bv, nv, ns, cps, group = plan
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dot, prec, _ = _dot_types(q.dtype)
    o = torch.empty(batch, length, heads, value_dim, device=q.device, dtype=v.dtype)
    segments, stash, suffix, sync = _segment_buffers(q, v, plan, 1)
    hf, hb, gtf, gtb = _summary_buffers(q, v, plan, True) if ns > 1 else (o,) * 4
    for phase in _phases(ns):
        _launch("fwd", _fwd_kernel, (segments // group,),
            q, k, v, g_fwd, g_bwd, o, stash, suffix, hf, hb, gtf, gtb, sync,
            *_strides(q), *_strides(k), *_strides(v), *_strides(g_fwd), *_strides(g_bwd), *_strides(o),
            length, heads, 0.5 * scale,
            K=key_dim, DV=value_dim, BV=bv, BT=bt, NS=ns, CPS=cps, SUB=group, DOT=dot, PREC=prec, PHASE=phase,
            num_warps=FWD_WARPS, max_registers=FWD_MAX_REGISTERS)
    return o, ((hf, hb, gtf, gtb) if ns > 1 else ())


def _backward(q, k, v, g_fwd, g_bwd, do, scale, plan, summaries):
    bt, bv, nv, ns, cps, _ = plan
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dot, prec, _ = _dot_types(q.dtype)
    if ns > 1:
        hf, hb, gtf, gtb = summaries
        dsf, dsb = _summary_buffers(q, v, plan, False)
    else:
        hf = hb = gtf = gtb = dsf = dsb = q  # unused
    if nv == 1:
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dgf, dgb = torch.empty_like(g_fwd), torch.empty_like(g_bwd)
        part_stride = 0
    else:
        shape = (nv, batch, length, heads, key_dim)
        dq, dk, dgf, dgb = (torch.empty(shape, device=q.device, dtype=torch.float32) for _ in range(4))
        part_stride = dq.stride(0)
    dv = torch.empty_like(v)
    programs, stash, suffix, sync = _segment_buffers(q, v, plan, 2)
    # per program slot, so a head split into value blocks keeps one identical copy per block (never at ViG's sizes)
    gate_sums = torch.empty(programs * cps * 2 * bt * key_dim if ns == 1 else 1, device=q.device, dtype=torch.float32)
    dqs, dks, dgfs, dgbs = (x[0] if nv > 1 else x for x in (dq, dk, dgf, dgb))
    capped = _cap_backward(programs, ns, q.device)
    for phase in _phases(ns):
        _launch("bwd", _bwd_kernel, (programs,),
            q, k, v, g_fwd, g_bwd, do, dq, dk, dv, dgf, dgb, stash, gate_sums, suffix, hf, hb, dsf, dsb, gtf, gtb, sync,
            *_strides(q), *_strides(k), *_strides(v), *_strides(g_fwd), *_strides(g_bwd), *_strides(do),
            *_strides(dqs), *_strides(dks), *_strides(dv), *_strides(dgfs), *_strides(dgbs), part_stride,
            length, heads, 0.5 * scale,
            K=key_dim, DV=value_dim, BV=bv, BT=bt, NS=ns, CPS=cps, DOT=dot, PREC=prec, PHASE=phase,
            CAPPED=capped, num_warps=BWD_WARPS, max_registers=BWD_MAX_REGISTERS if capped else None)
    if nv > 1:
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        dgf, dgb = dgf.sum(0).to(g_fwd.dtype), dgb.sum(0).to(g_bwd.dtype)
    return dq, dk, dv, dgf, dgb


# Two entry points to the same launchers. Eager calls go through an autograd.Function: through the
# torch.library op one eager fwd+bwd costs 1.5-1.9x the host time (benchmarks/bigla_host_overhead.py), more
# than the kernels' GPU time at ViG-T 224. Under torch.compile the op is the registered custom op, one
# opaque node (no graph break, no tracing into Triton) whose backward is registered with register_autograd.
# Either way only the inputs and, for the long-sequence path, the tiny segment summaries are saved for
# backward.


def _run_forward(q, k, v, g_fwd, g_bwd, scale, segments):
    """The forward launch: (inputs with unit last-dim stride, o, segment summaries or ())."""
    inputs = tuple(_last_dim_contiguous(x) for x in (q, k, v, g_fwd, g_bwd))
    with on_device_of(q):
        o, summaries = _forward(*inputs, scale, _op_plan(inputs[0], inputs[2], segments))
    return inputs, o, summaries


def _run_backward(q, k, v, g_fwd, g_bwd, do, summaries, scale, segments):
    """The backward launch: dq, dk, dv, dg_fwd, dg_bwd (summaries are ignored for one-segment plans)."""
    q, k, v, g_fwd, g_bwd, do = (_last_dim_contiguous(x) for x in (q, k, v, g_fwd, g_bwd, do))
    plan = _op_plan(q, v, segments)
    with on_device_of(q):
        return _backward(q, k, v, g_fwd, g_bwd, do, scale, plan, tuple(summaries) if plan[3] > 1 else ())


class _BiGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g_fwd, g_bwd, scale, segments):
        inputs, o, summaries = _run_forward(q, k, v, g_fwd, g_bwd, scale, segments)
        ctx.save_for_backward(*inputs, *summaries)
        ctx.scale, ctx.segments = scale, segments
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not silently zero
    def backward(ctx, do):
        saved = ctx.saved_tensors
        grads = _run_backward(*saved[:5], do, saved[5:], ctx.scale, ctx.segments)
        return (*grads, None, None)


def _summary_shapes(q, v, plan):
    batch, _, heads, key_dim = q.shape
    ns = plan[3]
    if ns == 1:
        return ((0,),) * 4
    state = (batch * heads, ns, key_dim, v.shape[-1])
    total = (batch * heads, ns, key_dim)
    return state, state, total, total


def _op_plan(q, v, segments):
    batch, length, heads, key_dim = q.shape
    return _plan(batch * heads, length, key_dim, v.shape[-1], q.device, segments or None)


@torch.library.custom_op("vig_kernels::bigla_fwd", mutates_args=())
def _bigla_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                  scale: float, segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """o and the forward segment summaries (hf, hb, gtf, gtb; empty for one-segment plans)."""
    _, o, summaries = _run_forward(q, k, v, g_fwd, g_bwd, scale, segments)
    if not summaries:
        plan = _op_plan(q, v, segments)
        summaries = tuple(q.new_empty(shape, dtype=torch.float32) for shape in _summary_shapes(q, v, plan))
    return (o, *summaries)


@_bigla_fwd_op.register_fake
def _(q, k, v, g_fwd, g_bwd, scale, segments):
    plan = _op_plan(q, v, segments)
    summaries = (q.new_empty(shape, dtype=torch.float32) for shape in _summary_shapes(q, v, plan))
    return (v.new_empty(v.shape), *summaries)


@torch.library.custom_op("vig_kernels::bigla_bwd", mutates_args=())
def _bigla_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                  do: torch.Tensor, hf: torch.Tensor, hb: torch.Tensor, gtf: torch.Tensor, gtb: torch.Tensor,
                  scale: float, segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """dq, dk, dv, dg_fwd, dg_bwd."""
    return _run_backward(q, k, v, g_fwd, g_bwd, do, (hf, hb, gtf, gtb), scale, segments)


@_bigla_bwd_op.register_fake
def _(q, k, v, g_fwd, g_bwd, do, hf, hb, gtf, gtb, scale, segments):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g_fwd, g_bwd))


def _setup_context(ctx, inputs, output):
    q, k, v, g_fwd, g_bwd, scale, segments = inputs
    ctx.save_for_backward(q, k, v, g_fwd, g_bwd, *output[1:])
    ctx.scale, ctx.segments = scale, segments


def _backward_rule(ctx, do, *unused_summary_grads):
    saved = ctx.saved_tensors
    grads = _bigla_bwd_op(*saved[:5], do, *saved[5:], ctx.scale, ctx.segments)
    return (*grads, None, None)


_bigla_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def bigla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                 scale: float | None = None, *, segments: int | None = None) -> torch.Tensor:
    """Fused bidirectional GLA, ``[B, T, H, K]`` q, k, gates and ``[B, T, H, V]`` v; returns o in v's dtype.

    ``segments`` overrides the automatic split of each sequence (for tests and tuning).
    Raises ``ValueError``/``TypeError`` for inputs the kernel does not support.
    """
    check_inputs(q, k, v, g_fwd, g_bwd)
    reason = unsupported_reason(q, k, v, g_fwd, g_bwd)
    if reason is not None:
        raise ValueError(f"bigla_triton: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0 or v.numel() == 0:  # empty batch or heads: nothing to launch, keep the graph connected
        return v.new_zeros(v.shape) + sum(x.sum() for x in (q, k, v, g_fwd, g_bwd)).to(v.dtype) * 0
    if torch.compiler.is_compiling():
        return _bigla_fwd_op(q, k, v, g_fwd, g_bwd, scale, segments or 0)[0]
    return _BiGLAFunction.apply(q, k, v, g_fwd, g_bwd, scale, segments or 0)


__all__ = ["GATE_MIN", "bigla_triton", "forward_segments_per_program", "unsupported_reason"]
