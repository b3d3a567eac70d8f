"""Memory and time of Vim's plain-PyTorch selective-scan reference on the CPU: one model forward and backward.

    python benchmarks/reference_scan_cpu.py --model vim_tiny --size 320 --batch 3

This is the path the CPU test suite and CPU users run (``auto`` picks the reference without CUDA). The run reports
the process's peak resident memory after the forward and after the backward (``ru_maxrss``, so run one case per
process) and the time of each. To compare with another version of the reference, run this script from the
repository root with that version's ``kernels/`` first on ``PYTHONPATH`` as ``vig_kernels`` (docs/selective_scan.md
gives the figures for the log-depth version of commit 960d481).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vig  # noqa: E402,F401  (registers the models)
import vig_kernels  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_tiny")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--out", help="JSON output path")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    images = torch.randn(args.batch, 3, args.size, args.size)
    with vig_kernels.use_backend("reference"):
        start = time.perf_counter()
        logits = model(images)
        forward_s, forward_peak = time.perf_counter() - start, peak_rss_gb()
        start = time.perf_counter()
        logits.square().mean().backward()
        backward_s, backward_peak = time.perf_counter() - start, peak_rss_gb()
    result = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "vig_kernels": vig_kernels.__file__,
              "args": vars(args), "forward_s": forward_s, "peak_gb_after_forward": forward_peak,
              "backward_s": backward_s, "peak_gb_after_backward": backward_peak}
    print(f"{args.model} {args.size}px batch {args.batch} ({vig_kernels.__file__}): forward {forward_s:.1f} s, "
          f"peak {forward_peak:.2f} GB; backward {backward_s:.1f} s, peak {backward_peak:.2f} GB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
