"""A/B timing of the fused selective scan: the working tree's kernels against a patched copy of
``kernels/selective_scan/fused.py``, in the same process on the same GPU.

    python benchmarks/selective_scan_ab.py --patch candidate.patch   # a patch to kernels/selective_scan/fused.py

Per shape of ``benchmarks/selective_scan.py``: graph-replay medians (L2 flushed) of forward and fwd+bwd, the
better of two alternating runs per version, and the largest RMS ratio of the patched version's output and six
gradients against the current ones on one input set (0 or rounding noise for a change of schedule only).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bigla import bench_graph, n_sets, rms_ratio  # noqa: E402
from bigla_ab import load_as_module, other_version  # noqa: E402
from selective_scan import MODELS, SHAPES, io_bytes, make_inputs  # noqa: E402

from vig_kernels.selective_scan import fused  # noqa: E402

FUSED = os.path.join("kernels", "selective_scan", "fused.py")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", required=True, help="patch to kernels/selective_scan/fused.py (version B)")
    ap.add_argument("--rep", type=float, default=30.0, help="do_bench repetition time per measurement (ms)")
    args = ap.parse_args()
    device = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    versions = {"A": fused, "B": load_as_module(other_version(None, args.patch, FUSED), "scan_candidate",
                                                 "vig_kernels.selective_scan")}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; A = working tree, B = + {args.patch}; "
          "graph replay, µs, best of 2 alternating runs")
    print("| model | T | B | fwd A | fwd B | fwd+bwd A | fwd+bwd B | B/A fwd+bwd | B vs A (RMS ratio) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for model, length, batch in SHAPES:
        channels = MODELS[model]
        make = lambda grad, b=batch, t=length, e=channels: make_inputs(b, t, e, device, grad)  # noqa: E731
        xs = make_inputs(min(batch, 8), length, channels, device, True)
        results = {}
        for name, module in versions.items():
            out = module.bi_selective_scan_triton(*xs)
            upstream = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(0), device=device,
                                   dtype=out.dtype)
            results[name] = (out, *torch.autograd.grad(out, xs, upstream))
        disagreement = max(rms_ratio(b, a) for a, b in zip(results["A"], results["B"]))
        sets = n_sets(sum(io_bytes(batch, length, channels)), l2)
        times = {name: [] for name in versions}
        for _ in range(2):
            for name, module in versions.items():
                times[name].append((bench_graph(module.bi_selective_scan_triton, make, sets, args.rep, False),
                                    bench_graph(module.bi_selective_scan_triton, make, sets, args.rep, True)))
        (fa, fba), (fb, fbb) = ((min(f for f, _ in times[name]), min(fb for _, fb in times[name]))
                                for name in versions)
        print(f"| {model} | {length} | {batch} | {fa * 1e3:.1f} | {fb * 1e3:.1f} | {fba * 1e3:.1f} | {fbb * 1e3:.1f} | "
              f"{fbb / fba:.3f} | {disagreement:.1e} |", flush=True)


if __name__ == "__main__":
    main()
