"""Loader throughput: float32 batches normalised by the workers against uint8 batches normalised on the device.

    python -m pretrain.data demo --out /tmp/demo --source digits
    python benchmarks/loader_throughput.py /tmp/demo/train --out /tmp/loader.json                 # CPU only
    python benchmarks/loader_throughput.py /tmp/demo/train --workers 14 --pin-memory --device cuda --out ...

Each case iterates ``build_loader(shards, task, batch, size, normalize=...)`` (resampled, ``--batches`` batches
after ``--skip`` warm-up batches, which start the workers) and, per batch, moves it to ``--device`` as the
trainers do: ``images.to(device)`` for float32 batches, ``DeviceNormalize`` for uint8 ones, then synchronises.
It reports batches and images per second and the loader's own share of time spent waiting for the workers.
Nothing else runs, so this is the rate at which the loader alone could feed a training step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data import DeviceNormalize, build_loader  # noqa: E402


def run_case(args, normalize: bool) -> dict:
    device = torch.device(args.device)
    loader = build_loader(args.shards, args.task, args.batch, args.image_size, num_workers=args.workers,
                          resampled=True, samples_per_epoch=args.batch * (args.skip + args.batches),
                          normalize=normalize, pin_memory=args.pin_memory,
                          # One epoch is timed: the next one's workers, started early, would compete with it.
                          start_next_epoch_early=False)
    to_device = DeviceNormalize()
    start = None
    for index, batch in enumerate(loader):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = to_device(images, device) if not normalize else images.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index + 1 == args.skip:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    rate = args.batches / elapsed
    return {"case": "float32, normalised by the workers" if normalize else "uint8, normalised on the device",
            "normalize": normalize, "batches_per_second": rate, "images_per_second": rate * args.batch,
            "seconds_per_batch": 1 / rate, "data_wait_fraction": loader.stats()["data_wait_fraction"],
            "batch_bytes": images.numel() * (4 if normalize else 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--task", default="mae", choices=["mae", "clip", "eval"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per case")
    parser.add_argument("--skip", type=int, default=3, help="batches before timing starts")
    parser.add_argument("--pin-memory", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.skip < 1 or args.batches < 1:
        parser.error("--skip and --batches must be at least 1")
    results = [run_case(args, normalize) for normalize in (True, False)]
    environment = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else "cpu"}
    with open(args.out, "w") as f:
        json.dump({"environment": environment, "args": vars(args), "results": results}, f, indent=1)
    print(f"{environment}; task {args.task}, batch {args.batch} at {args.image_size}px, {args.workers} workers, "
          f"pin_memory {args.pin_memory}, to {args.device}")
    print("| batches | images/s | ms per batch | loader wait | batch size |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['images_per_second']:.0f} | {1e3 * r['seconds_per_batch']:.0f} | "
              f"{r['data_wait_fraction']:.0%} | {r['batch_bytes'] / 2**20:.0f} MiB |")
    print(f"uint8 / float32: {results[1]['images_per_second'] / results[0]['images_per_second']:.2f}x")


if __name__ == "__main__":
    main()
