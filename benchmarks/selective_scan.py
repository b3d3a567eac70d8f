"""Benchmark of the fused bidirectional selective scan (Vim's mixer core) against the plain-PyTorch reference
path and the HBM floor.

    python benchmarks/selective_scan.py                   # Vim-T/S/B shapes, writes results/selective_scan.md
    python benchmarks/selective_scan.py --sweep           # channel blocks and warps of both kernels first

Per shape (inner channels E = 2 x width, d_state N = 16; u, B, C bf16 and delta fp32 as Vim produces them
under bf16 autocast; A and D fp32):
(a) this kernel, ``vig_kernels.selective_scan.fused.bi_selective_scan_triton``, eager calls and CUDA-graph
    replays (no launch overhead);
(b) the reference path that ran before it, ``bi_selective_scan_reference`` (chunked scans, each chunk
    checkpointed; log-depth inside a chunk until 2026-12-07, step by step since), eager calls. The official
    path (``mamba_ssm``'s CUDA scan, one launch per direction on a flipped copy) is a compiled extension that
    the GPU image lacks;
(c) the HBM floor: every input read once, every output written once, over the copy bandwidth measured in
    the same run.
Times are ``triton.testing.do_bench`` medians (L2 flushed before each repetition) with input sets rotated
as in ``benchmarks/bigla.py``; fwd+bwd is one forward plus ``torch.autograd.grad``; peak = max allocated
during one fwd+bwd above the allocation before it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bigla import bench, bench_graph, copy_bandwidth, n_sets, peak_mib, rms_ratio  # noqa: E402

from vig_kernels.selective_scan import bi_selective_scan_reference, fused  # noqa: E402

MODELS = {"Vim-T": 384, "Vim-S": 768, "Vim-B": 1536}  # inner channels
SHAPES = [("Vim-T", 197, 128), ("Vim-S", 197, 128), ("Vim-B", 197, 64), ("Vim-T", 1025, 32)]
D_STATE = 16
# (BLOCK_E, warps) candidates: the settings that compile for sm_90 without spilling (or with 8 B at most)
SWEEP = {"fwd": [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)], "bwd": [(8, 4), (8, 8), (16, 4), (16, 8), (32, 8)]}


def make_inputs(batch, length, channels, device, grad):
    u = torch.randn(2, batch, length, channels, device=device, dtype=torch.bfloat16)
    delta = F.softplus(torch.randn(2, batch, length, channels, device=device) - 3)
    A = -torch.arange(1, D_STATE + 1, device=device, dtype=torch.float32).repeat(2, channels, 1)
    B, C = (torch.randn(2, batch, length, D_STATE, device=device, dtype=torch.bfloat16) for _ in range(2))
    D = torch.ones(2, channels, device=device)
    return [x.requires_grad_(grad) for x in (u, delta, A, B, C, D)]


def io_bytes(batch, length, channels):
    """Forward and backward floors: bf16 u, B, C, y, dy and their gradients, fp32 delta and its gradient."""
    tokens = batch * length
    inputs = tokens * 2 * (channels * (2 + 4) + 2 * D_STATE * 2)
    forward = inputs + tokens * channels * 2
    backward = inputs + tokens * channels * 2 + inputs  # read inputs and dy, write du, ddelta, dB, dC
    return forward, backward


def check(batch, length, channels, device):
    """RMS ratios of the bf16 kernel against the float64 reference, output and gradients."""
    xs = make_inputs(batch, length, channels, device, True)
    out = fused.bi_selective_scan_triton(*xs)
    grad = torch.randn_like(out)
    got = [out] + list(torch.autograd.grad(out, xs, grad))
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    ref = bi_selective_scan_reference(*ref_xs)
    want = [ref] + list(torch.autograd.grad(ref, ref_xs, grad.double()))
    return max(rms_ratio(a, b) for a, b in zip(got, want))


def sweep(device, l2, rep):
    """Channel blocks and warps of each kernel at Vim-T 197/128; sets the fastest of each. The backward's rows
    time fwd+bwd with the forward's fastest setting."""
    model, length, batch = SHAPES[0]
    make = lambda grad: make_inputs(batch, length, MODELS[model], device, grad)  # noqa: E731
    sets = n_sets(sum(io_bytes(batch, length, MODELS[model])), l2)
    rows, best = [], {}
    for kind in ("fwd", "bwd"):
        for block_e, warps in SWEEP[kind]:
            setattr(fused, f"{kind.upper()}_BLOCK_E", block_e)
            setattr(fused, f"{kind.upper()}_WARPS", warps)
            try:
                ms = bench_graph(fused.bi_selective_scan_triton, make, sets, rep, kind == "bwd")
            except Exception as exc:  # a configuration that does not compile or fit
                print(f"{kind} BLOCK_E={block_e} warps={warps}: {type(exc).__name__}: {exc}"[:200], flush=True)
                continue
            rows.append((kind, block_e, warps, ms))
            print(f"{kind} BLOCK_E={block_e} warps={warps}: {ms * 1e3:.1f} us", flush=True)
            if ms < best.get(kind, (None, None, float("inf")))[2]:
                best[kind] = (block_e, warps, ms)
        block_e, warps, _ = best[kind]
        setattr(fused, f"{kind.upper()}_BLOCK_E", block_e)
        setattr(fused, f"{kind.upper()}_WARPS", warps)
    lines = [f"| kernel | BLOCK_E | warps | {model} {length}/{batch} µs (graph replay; bwd rows time fwd+bwd) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {b} | {w} | {ms * 1e3:.1f} |" for k, b, w, ms in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--sweep", action="store_true", help="sweep channel blocks and warps first")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "selective_scan.md"))
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bandwidth = copy_bandwidth()
    sweep_table = sweep(device, l2, args.rep) if args.sweep else ""
    header = (f"device: {props.name} ({props.multi_processor_count} SMs), date: {datetime.date.today()}, "
              f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}; "
              f"copy bandwidth {bandwidth / 1e12:.3f} TB/s; ours: forward BLOCK_E={fused.FWD_BLOCK_E} "
              f"warps={fused.FWD_WARPS}, backward BLOCK_E={fused.BWD_BLOCK_E} warps={fused.BWD_WARPS}")
    print(header, flush=True)
    results = []
    for model, length, batch in SHAPES:
        channels = MODELS[model]
        make = lambda grad, b=batch, t=length, e=channels: make_inputs(b, t, e, device, grad)  # noqa: E731
        fwd_io, bwd_io = io_bytes(batch, length, channels)
        sets = n_sets(fwd_io, l2)
        r = {"model": model, "T": length, "B": batch, "E": channels,
             "floor_fwd": fwd_io / bandwidth * 1e3, "floor_fb": (fwd_io + bwd_io) / bandwidth * 1e3,
             "err": check(min(batch, 8), length, channels, device)}
        for key, fn, timer in (("ours", fused.bi_selective_scan_triton, bench),
                               ("ours_graph", fused.bi_selective_scan_triton, bench_graph),
                               ("ref", bi_selective_scan_reference, bench)):
            r[f"{key}_fwd"] = timer(fn, make, sets, args.rep, False)
            r[f"{key}_fb"] = timer(fn, make, sets, args.rep, True)
        r["ours_peak"] = peak_mib(fused.bi_selective_scan_triton, make)
        r["ref_peak"] = peak_mib(bi_selective_scan_reference, make)
        print(json.dumps(r), flush=True)
        results.append(r)
    lines = [header, "",
             "| model | T | B | E | ours fwd µs (graph) | ours fwd+bwd µs (graph) | ours fwd / fwd+bwd µs (eager) | "
             "reference fwd / fwd+bwd µs (eager) | reference / ours fwd+bwd (eager) | fwd floor µs | ours fwd / "
             "floor (graph) | fwd+bwd floor µs | peak MiB ours / reference | max RMS ratio bf16 vs float64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['T']} | {r['B']} | {r['E']} | {r['ours_graph_fwd'] * 1e3:.1f} | "
            f"{r['ours_graph_fb'] * 1e3:.1f} | {r['ours_fwd'] * 1e3:.1f} / {r['ours_fb'] * 1e3:.1f} | "
            f"{r['ref_fwd'] * 1e3:.0f} / {r['ref_fb'] * 1e3:.0f} | {r['ref_fb'] / r['ours_fb']:.1f}× | "
            f"{r['floor_fwd'] * 1e3:.1f} | {r['ours_graph_fwd'] / r['floor_fwd']:.1f}× | {r['floor_fb'] * 1e3:.1f} | "
            f"{r['ours_peak']:.0f} / {r['ref_peak']:.0f} | {r['err']:.1e} |")
    text = "\n".join(lines + ([""] + [sweep_table] if sweep_table else [])) + "\n"
    print(text, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
