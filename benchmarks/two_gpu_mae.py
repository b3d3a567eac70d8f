"""Summarise MAE runs of the two-GPU check (issue 5): loss after 100 updates and images/s, from TensorBoard.

    python benchmarks/two_gpu_mae.py runs/bench_2gpu/1gpu runs/bench_2gpu/ddp runs/bench_2gpu/zero2 \
        --out benchmarks/results/two_gpu_mae.json

Each argument is a run's ``output_dir`` (``pretrain/mae.py`` or ``pretrain/clip.py`` with ``train.log_every=1``);
the first is the reference. Per run: the mean of the last ``--last`` logged losses; images/s from the event wall
times between update ``--from`` and the last one (global batch x updates / seconds); the share of that span the
trainer spent waiting for the loader, from the loader's running total of seconds waited (``data_wait_seconds``),
and the images/s without that time; the largest ``data_wait_fraction`` logged in the span (each over the loader's
last 50 batches); and the median of the trainer's own 20-update windows (``images_per_second``) from update
``--from`` on. Runs logged before ``data_wait_seconds`` existed carry a ``data_wait_fraction`` taken since the start
of the run, which this script does not convert: their wait columns are left empty. For such runs,
``--bounds SUMMARY.json ...`` bounds each span's wait from the summaries this script wrote (see
``since_start_wait_bound``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_run(run_dir: str) -> dict[str, list]:
    files = sorted(glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file under {run_dir}/logs")
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                series.setdefault(tag, {})[event.step] = (event.wall_time, event.value)
    return {tag: sorted((step, wall, value) for step, (wall, value) in points.items())
            for tag, points in series.items()}


def summarise(run_dir: str, first: int, last: int, global_batch: int | None) -> dict:
    series = read_run(run_dir)
    losses = series["loss"]
    final_step = losses[-1][0]
    window = [value for step, _, value in losses[-last:]]
    rates = [value for step, _, value in series.get("images_per_second", []) if step >= first]
    waited = {step: value for step, _, value in series.get("data_wait_seconds", [])}
    windowed = [value for step, _, value in series.get("data_wait_fraction", []) if step > first and waited]
    out = {"run": run_dir, "updates": final_step, "loss_last_mean": statistics.fmean(window),
           "loss_last_n": len(window), "loss_final": losses[-1][2], "loss_first": losses[0][2],
           "images_per_second_median_window": statistics.median(rates) if rates else None,
           "data_wait_share": None, "data_wait_fraction_max": max(windowed) if windowed else None}
    walls = {step: wall for step, wall, _ in losses}
    if global_batch and first in walls and final_step > first:
        seconds = walls[final_step] - walls[first]
        out["images_per_second_wall"] = global_batch * (final_step - first) / seconds
        if first in waited and final_step in waited:
            # The same span without the time spent waiting for the loader: what the GPUs and the training loop
            # alone would give.
            wait = waited[final_step] - waited[first]
            out["data_wait_share"] = wait / seconds
            out["images_per_second_excluding_wait"] = global_batch * (final_step - first) / (seconds - wait)
    recipe = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe):
        out["recipe"] = open(recipe).read()
    kept = ("loss", "images_per_second", "data_wait_fraction", "data_wait_seconds", "grad_norm", "lr")
    out["series"] = {tag: [[step, round(wall, 3), value] for step, wall, value in points]
                     for tag, points in series.items() if tag in kept}
    return out


def since_start_wait_bound(series: dict, first: int) -> tuple[str, float]:
    """Bound the share of updates ``first``..last spent waiting, from a ``data_wait_fraction`` logged as the share
    since the loader started (before ``data_wait_seconds`` existed).

    The wait in the span is ``f_end R_end - f_first R_first`` with ``R`` the time since the loader started, which is
    unknown but at least the time since update 1: where f fell over the span, the share is at most the returned
    value; where it rose, at least.
    """
    fractions = {step: value for step, _, value in series["data_wait_fraction"]}
    walls = {step: wall for step, wall, _ in series["loss"]}
    last = max(walls)
    span, before = walls[last] - walls[first], walls[first] - walls[min(walls)]
    bound = (fractions[last] * span + (fractions[last] - fractions[first]) * before) / span
    return ("at most" if fractions[first] > fractions[last] else "at least"), bound


def print_bounds(paths: list[str], first: int) -> None:
    print(f"| summary | run | loader wait, updates {first}-end |")
    print("|---|---|---:|")
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                relation, bound = since_start_wait_bound(r["series"], first)
                print(f"| {os.path.basename(path)} | {r['name']} | {relation} {bound:.1%} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run output_dirs; the first is the reference (1 GPU)")
    parser.add_argument("--bounds", nargs="+", metavar="SUMMARY", help="only print since-start wait bounds")
    parser.add_argument("--names", nargs="+", help="labels (default: the folder names)")
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--from", dest="first", type=int, default=60, help="first update of the throughput span")
    parser.add_argument("--last", type=int, default=10, help="losses averaged at the end")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.bounds:
        print_bounds(args.bounds, args.first)
        return
    if not args.runs or not args.out:
        parser.error("give run output_dirs and --out, or --bounds")
    names = args.names or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    results = []
    for name, run in zip(names, args.runs, strict=True):
        try:
            results.append({"name": name, **summarise(run, args.first, args.last, args.global_batch)})
        except Exception as exc:  # noqa: BLE001  (report the others)
            results.append({"name": name, "run": run, "error": f"{type(exc).__name__}: {exc}"})
    reference = results[0] if "error" not in results[0] else None
    for r in results:
        if reference and "error" not in r:
            r["loss_vs_reference"] = r["loss_last_mean"] / reference["loss_last_mean"] - 1
            for key in ("wall", "excluding_wait"):
                if r.get(f"images_per_second_{key}") and reference.get(f"images_per_second_{key}"):
                    r[f"speedup_{key}"] = r[f"images_per_second_{key}"] / reference[f"images_per_second_{key}"]
            if r.get("images_per_second_median_window") and reference.get("images_per_second_median_window"):
                r["speedup_window"] = (r["images_per_second_median_window"]
                                       / reference["images_per_second_median_window"])
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"| run | updates | loss (mean of last {args.last}) | vs {names[0]} | images/s (updates {args.first}-end) | "
          "speed-up | loader wait (span / largest 50-batch window) | images/s without loader wait | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
        print(f"| {r['name']} | {r['updates']} | {r['loss_last_mean']:.4f} | {fmt(r.get('loss_vs_reference'), '+.2%')} "
              f"| {fmt(r.get('images_per_second_wall'), '.0f')} | {fmt(r.get('speedup_wall'), '.2f')}x "
              f"| {fmt(r['data_wait_share'], '.1%')} / {fmt(r['data_wait_fraction_max'], '.1%')} "
              f"| {fmt(r.get('images_per_second_excluding_wait'), '.0f')} "
              f"| {fmt(r.get('speedup_excluding_wait'), '.2f')}x |")

if __name__ == "__main__":
    main()
