"""How long a training loop waits for the loader at epoch boundaries, with and without the next epoch's workers
started early (``build_loader(..., start_next_epoch_early=...)``).

    python -m pretrain.data demo --out /tmp/demo --source digits
    python benchmarks/epoch_boundary.py /tmp/demo/train --workers 2 --batch 64 --step-ms 150 --out /tmp/boundary.json

Each case iterates ``--epochs`` resampled epochs of ``--steps`` uint8 batches. After each batch the loop sleeps
``--step-ms``: a training step that runs on an accelerator and leaves the CPU to the workers. Choose it longer
than the loader needs per batch, so that within an epoch the loop hardly waits and what is left is the boundary.
Reported per case: the wait for the very first batch (workers starting from nothing), the mean and largest wait
for the first batch of every later epoch, the mean wait for the other batches, and the total time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data import build_loader  # noqa: E402


def run_case(args, early: bool) -> dict:
    loader = build_loader(args.shards, args.task, args.batch, args.image_size, num_workers=args.workers,
                          resampled=True, samples_per_epoch=args.batch * args.steps, normalize=False,
                          start_next_epoch_early=early)
    waits: list[list[float]] = []
    start = time.perf_counter()
    for _ in range(args.epochs):
        epoch_waits = []
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            epoch_waits.append(time.perf_counter() - asked)
            time.sleep(args.step_ms / 1e3)
        waits.append(epoch_waits)
    total = time.perf_counter() - start
    boundary = [epoch[0] for epoch in waits[1:]]
    inside = [wait for epoch in waits for wait in epoch[1:]]
    return {"start_next_epoch_early": early, "first_batch_s": waits[0][0], "boundary_mean_s": statistics.mean(boundary),
            "boundary_max_s": max(boundary), "other_batches_mean_s": statistics.mean(inside), "total_s": total,
            "waits_s": waits}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--task", default="mae", choices=["mae", "clip"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=150.0, help="simulated training step")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.steps < 2:
        parser.error("--epochs and --steps must be at least 2")
    results = [run_case(args, early) for early in (False, True)]
    environment = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"environment": environment, "args": vars(args), "results": results}, f, indent=1)
    print(f"{environment}; task {args.task}, batch {args.batch} at {args.image_size}px, {args.workers} workers, "
          f"{args.epochs} epochs of {args.steps} batches, {args.step_ms:.0f} ms per step")
    print("| next epoch started early | first batch s | epoch boundary: mean s | max s | other batches: mean ms "
          "| total s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {'yes' if r['start_next_epoch_early'] else 'no'} | {r['first_batch_s']:.2f} | "
              f"{r['boundary_mean_s']:.2f} | {r['boundary_max_s']:.2f} | {1e3 * r['other_batches_mean_s']:.1f} | "
              f"{r['total_s']:.1f} |")


if __name__ == "__main__":
    main()
