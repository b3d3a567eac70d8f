"""Latency against throughput: the fused BiGLA op at ViG-T heads and 196 tokens with 1, 2 and 3 programs per SM.

    python benchmarks/bigla_occupancy.py            # one GPU; CUDA-graph replay, as the main table
    ncu --kernel-name regex:"_fwd_kernel|_bwd_kernel" --launch-skip 2 --launch-count 2 \
        --section SchedulerStats --section WarpStateStats --section InstructionStats --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis --section SourceCounters \
        python benchmarks/bigla_dram_bytes.py 128 196 3            # the scheduler view of the same kernels

Each program runs one (batch, head) sequence, so a batch of SMs/3 sequences puts one program on each SM and
its time is the latency of one program's chain of chunk steps; with three programs per SM (the ViG-T 224
batch-128 grid) the programs also compete for issue slots. Results and reading: docs/kernels.md.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bigla import bench_graph, make_gla_inputs  # noqa: E402

from kernels.bigla import fused  # noqa: E402

HEADS, TOKENS = 3, 196


def with_segments(segments):
    """The op with a fixed split of each sequence (segments=1: one program per sequence at every batch)."""
    return lambda q, k, v, g_fwd, g_bwd: fused.bigla_triton(q, k, v, g_fwd, g_bwd, segments=segments)


def previous_plan_segments(batch_heads, tokens):
    """The launcher's split without the short-sequence rule (MIN_SPLIT_CHUNKS = 0): fill 2 programs per SM."""
    kept, fused.MIN_SPLIT_CHUNKS = fused.MIN_SPLIT_CHUNKS, 0
    try:
        return fused._plan(batch_heads, tokens, 32, 64, torch.device("cuda"))[3]
    finally:
        fused.MIN_SPLIT_CHUNKS = kept


def segment_plans():
    """One segment, the previous split and the launcher's current plan, for grids below 2 programs per SM."""
    print("\nViG-T heads, graph replay: fwd / fwd+bwd µs with one segment, the previous split (fill 2 programs per "
          "SM) and the current plan")
    print("| batch | tokens | chunks | one segment | previous: segments, fwd / f+b | current: segments, fwd / f+b |")
    print("|---|---|---|---|---|---|")
    for batch, tokens in ((1, 196), (8, 196), (16, 196), (32, 196), (32, 256), (32, 400), (32, 576), (32, 784),
                          (32, 1024), (32, 2048), (8, 4096)):
        make = lambda grad, b=batch, t=tokens: make_gla_inputs(b, t, HEADS, "cuda", grad)  # noqa: E731
        chunks = -(-tokens // fused.CHUNK)
        previous = previous_plan_segments(batch * HEADS, tokens)
        current = fused._plan(batch * HEADS, tokens, 32, 64, torch.device("cuda"))[3]
        cells = []
        for segments in (1, previous, current):
            op = with_segments(segments)
            fwd, fwd_bwd = (bench_graph(op, make, 4, 60, backward) * 1e3 for backward in (False, True))
            cells.append(f"{fwd:.1f} / {fwd_bwd:.1f}" if segments == 1 else f"{segments}: {fwd:.1f} / {fwd_bwd:.1f}")
        print(f"| {batch} | {tokens} | {chunks} | " + " | ".join(cells) + " |")


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch in (sms // HEADS, 2 * sms // HEADS, 3 * sms // HEADS, 128, 256):
        make = lambda grad, b=batch: make_gla_inputs(b, TOKENS, HEADS, "cuda", grad)  # noqa: E731
        fused.LAST_LAUNCH.clear()
        fwd = bench_graph(with_segments(1), make, 4, 100, False) * 1e3
        fwd_bwd = bench_graph(with_segments(1), make, 4, 100, True) * 1e3
        regs = ", ".join(f"{name} {kernel.n_regs} registers / {kernel.n_spills} spills"
                         for name, kernel in fused.LAST_LAUNCH.items())
        rows.append((batch, batch * HEADS, batch * HEADS / sms, fwd, fwd_bwd, regs))
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, ViG-T heads, {TOKENS} tokens, bf16, graph replay")
    print("| batch | programs | programs per SM | fwd µs | fwd+bwd µs | kernels |")
    print("|---|---|---|---|---|---|")
    for batch, programs, per_sm, fwd, fwd_bwd, regs in rows:
        print(f"| {batch} | {programs} | {per_sm:.2f} | {fwd:.1f} | {fwd_bwd:.1f} | {regs} |")
    segment_plans()


if __name__ == "__main__":
    main()
