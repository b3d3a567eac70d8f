"""Latency against throughput: the fused BiGLA op at ViG-T heads and 196 tokens with 1, 2 and 3 programs per SM.

    python benchmarks/bigla_occupancy.py            # one GPU; CUDA-graph replay, as the main table
    ncu --kernel-name regex:"_fwd_kernel|_bwd_kernel" --launch-skip 2 --launch-count 2 \
        --section SchedulerStats --section WarpStateStats --section InstructionStats --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis --section SourceCounters \
        python benchmarks/bigla_dram_bytes.py 128 196 3            # the scheduler view of the same kernels

Each program runs one (batch, head) sequence, so a batch of SMs/3 sequences puts one program on each SM and
its time is the latency of one program's chain of chunk steps; with three programs per SM (the ViG-T 224
batch-128 grid) the programs also compete for issue slots. Then a sweep of segments per sequence at the shapes
where splitting matters, which the launcher's split (fused._plan, SEGMENT_COST) is fitted to, and a sweep of
the segments one forward program owns at that split (fused._forward_group). ``--part`` runs one of the three.
Results and reading: docs/kernels.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bigla import bench_graph, make_gla_inputs  # noqa: E402

from vig_kernels.bigla import fused  # noqa: E402

HEADS, TOKENS = 3, 196


def with_segments(segments):
    """The op with a fixed split of each sequence (segments=1: one program per sequence at every batch)."""
    return lambda q, k, v, g_fwd, g_bwd: fused.bigla_triton(q, k, v, g_fwd, g_bwd, segments=segments)


SWEEP_SHAPES = [(3, 1024, 32), (6, 1024, 32), (12, 1024, 32), (3, 4096, 8), (6, 4096, 8), (12, 4096, 8),
                (3, 196, 32), (3, 196, 64), (3, 576, 32)]  # (heads: ViG-T/S/B, tokens, batch)
SWEEP_SEGMENTS = (1, 2, 3, 4, 5, 6, 8, 11, 16, 22, 32)


def segment_sweep():
    """fwd+bwd against the number of segments per sequence; the launcher's plan (fused._plan) is marked *."""
    print("\nSegments per sequence, graph replay, fwd / fwd+bwd µs (* the launcher's plan)")
    print("| heads | tokens | batch | chunks | " + " | ".join(str(n) for n in SWEEP_SEGMENTS) + " |")
    print("|---|---|---|---|" + "---|" * len(SWEEP_SEGMENTS))
    for heads, tokens, batch in SWEEP_SHAPES:
        make = lambda grad, b=batch, t=tokens, h=heads: make_gla_inputs(b, t, h, "cuda", grad)  # noqa: E731
        chunks = -(-tokens // fused.CHUNK)
        planned = fused._plan(batch * heads, tokens, 32, 64, torch.device("cuda"))[3]
        cells = []
        for segments in SWEEP_SEGMENTS:
            if fused._plan(batch * heads, tokens, 32, 64, torch.device("cuda"), segments=segments)[3] != segments:
                cells.append("")
                continue
            op = with_segments(segments)
            fwd, fwd_bwd = (bench_graph(op, make, 4, 30, backward) * 1e3 for backward in (False, True))
            cells.append(f"{'*' if segments == planned else ''}{fwd:.1f} / {fwd_bwd:.1f}")
        print(f"| {heads} | {tokens} | {batch} | {chunks} | " + " | ".join(cells) + " |", flush=True)


def forward_group_sweep():
    """Forward time against the segments each forward program owns, at the plan's split (every divisor of
    it), and fwd+bwd with one segment per forward program against the plan's choice where they differ."""
    print("\nSegments per forward program at the plan's split, graph replay, fwd µs (* the plan's choice); "
          "fwd+bwd µs with 1 and with the plan's choice")
    print("| heads | tokens | batch | segments | fwd by segments per forward program | fwd+bwd 1 → plan |")
    print("|---|---|---|---|---|---|")
    for heads, tokens, batch in SWEEP_SHAPES:
        make = lambda grad, b=batch, t=tokens, h=heads: make_gla_inputs(b, t, h, "cuda", grad)  # noqa: E731
        plan = fused._plan(batch * heads, tokens, 32, 64, torch.device("cuda"))
        segments, planned = plan[3], plan[5]
        op = with_segments(segments)
        times = {}
        for group in (g for g in range(1, segments + 1) if segments % g == 0):
            with fused.forward_segments_per_program(group):
                times[group] = [bench_graph(op, make, 4, 30, False) * 1e3]
                if group in (1, planned) and planned != 1:
                    times[group].append(bench_graph(op, make, 4, 30, True) * 1e3)
        fwd = ", ".join(f"{group}: {'*' if group == planned else ''}{t[0]:.1f}" for group, t in times.items())
        both = f"{times[1][1]:.1f} → {times[planned][1]:.1f}" if planned != 1 else ""
        print(f"| {heads} | {tokens} | {batch} | {segments} | {fwd} | {both} |", flush=True)


def occupancy():
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


def main():
    parts = {"occupancy": occupancy, "segments": segment_sweep, "groups": forward_group_sweep}
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", *parts], default="all")
    args = ap.parse_args()
    for name, part in parts.items():
        if args.part in ("all", name):
            part()


if __name__ == "__main__":
    main()
