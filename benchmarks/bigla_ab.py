"""A/B timing of the fused BiGLA op: the working tree's kernels against another version of
``kernels/bigla/fused.py`` in the same process, on the same GPU, in alternating runs.

    python benchmarks/bigla_ab.py --base HEAD~1                        # a git revision of fused.py
    python benchmarks/bigla_ab.py --patch benchmarks/results/x.patch   # the working tree with a patch applied
    python benchmarks/bigla_ab.py --patch x.patch y.patch --shapes 3,196,128 12,4096,8

Each other version is loaded as a separate module (its torch.library namespace renamed), so all sets of
kernels compile side by side and every row compares like with like: graph replay as in the main table
(``bigla.bench_graph``), L2 flushed, fwd+bwd and forward medians, ``--runs`` alternating runs each. With
``--patch`` the working tree is A and each patched version B, C, ...; with ``--base`` the working tree is B.
Prints a markdown table (heads, tokens, batch) per shape, with each version's fwd+bwd peak memory (as in the main
table) and its largest RMS ratio against A over o and the five gradients on one input set (0 or rounding noise
for a change of schedule only).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bigla import bench_graph, make_gla_inputs, peak_mib, rms_ratio  # noqa: E402

from vig_kernels.bigla import fused  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = os.path.join("kernels", "bigla", "fused.py")
SHAPES = [(3, 196, 128), (12, 196, 128), (3, 1024, 32), (6, 1024, 32), (12, 1024, 32), (12, 4096, 8)]


def other_version(base: str | None, patch: str | None, fused: str = FUSED) -> str:
    """Source of a fused.py (BiGLA's by default) at a git revision, or the working tree's with a patch applied."""
    if base:
        return subprocess.run(["git", "show", f"{base}:{fused}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "fused.py")
        with open(os.path.join(ROOT, fused)) as src, open(target, "w") as dst:
            dst.write(src.read())
        subprocess.run(["patch", "--quiet", target, os.path.abspath(patch)], check=True)
        with open(target) as fh:
            return fh.read()


def load_as_module(source: str, name: str, package: str = "vig_kernels.bigla"):
    """Import a copy of a fused.py under another module name; its custom ops get their own namespace, and its
    imports from its package (``from .inputs import ...``, ``from ..backend import ...``) name ``package``."""
    source = source.replace("vig_kernels::", f"{name}::")
    parent = package.rpartition(".")[0]
    source = re.sub(r"^from \.\.(\w+) import", rf"from {parent}.\1 import", source, flags=re.MULTILINE)
    source = re.sub(r"^from \.(\w+) import", rf"from {package}.\1 import", source, flags=re.MULTILINE)
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def disagreement(versions: dict, make) -> dict:
    """Largest RMS ratio over o and the five gradients of each version after A against A, on one input set: a
    candidate that only reschedules the kernels gives 0 or rounding noise, and a wrong one shows here."""
    xs = make(True)
    results = {}
    for name, module in versions.items():
        out = module.bigla_triton(*xs)
        upstream = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(0), device=out.device,
                               dtype=out.dtype)
        results[name] = (out, *torch.autograd.grad(out, xs, upstream))
    return {name: max(rms_ratio(got, ref) for got, ref in zip(results[name], results["A"]))
            for name in list(versions)[1:]}


def main():
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="git revision whose fused.py is A (the working tree is B)")
    which.add_argument("--patch", nargs="+",
                       help="patches to fused.py whose results are B, C, ... (the working tree is A)")
    ap.add_argument("--shapes", nargs="+", help="heads,tokens,batch triples (default: six table shapes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rep", type=float, default=40.0, help="do_bench repetition time per measurement (ms)")
    args = ap.parse_args()

    if args.base:
        versions = {"A": load_as_module(other_version(args.base, None), "bigla_ab_other"), "B": fused}
        label = f"A = {args.base}, B = working tree"
    else:
        versions = {"A": fused}
        for i, patch in enumerate(args.patch):
            versions[chr(ord("B") + i)] = load_as_module(other_version(None, patch), f"bigla_ab_other{i}")
        label = "A = working tree, " + ", ".join(f"{name} = + {patch}" for name, patch in
                                                 zip(list(versions)[1:], args.patch))
    shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes] if args.shapes else SHAPES
    others = list(versions)[1:]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {label}; graph replay, µs, "
          f"{args.runs} alternating runs (median of each run's do_bench)")
    print("| heads | tokens | batch | fwd A | " + " | ".join(f"fwd {n}" for n in others) + " | fwd+bwd A | "
          + " | ".join(f"fwd+bwd {n} | {n}/A | {n} vs A (RMS ratio)" for n in others) + " | peak A (MiB) | "
          + " | ".join(f"peak {n}" for n in others) + " |")
    print("|---" * (6 + 5 * len(others)) + "|")
    for heads, tokens, batch in shapes:
        make = lambda grad, b=batch, t=tokens, h=heads: make_gla_inputs(b, t, h, "cuda", grad)  # noqa: E731
        differs = disagreement(versions, make)
        peaks = {name: peak_mib(lambda *xs, m=module: m.bigla_triton(*xs), make) for name, module in versions.items()}
        times = {name: {"fwd": [], "fb": []} for name in versions}
        for _ in range(args.runs):
            for name, module in versions.items():
                op = lambda *xs, m=module: m.bigla_triton(*xs)  # noqa: E731
                times[name]["fwd"].append(bench_graph(op, make, 4, args.rep, False) * 1e3)
                times[name]["fb"].append(bench_graph(op, make, 4, args.rep, True) * 1e3)
        mean = {name: {k: sum(v) / len(v) for k, v in t.items()} for name, t in times.items()}
        print(f"| {heads} | {tokens} | {batch} | {mean['A']['fwd']:.1f} | "
              + " | ".join(f"{mean[n]['fwd']:.1f}" for n in others) + f" | {mean['A']['fb']:.1f} | "
              + " | ".join(f"{mean[n]['fb']:.1f} | {mean[n]['fb'] / mean['A']['fb']:.3f} | {differs[n]:.1e}"
                           for n in others) + f" | {peaks['A']:.1f} | "
              + " | ".join(f"{peaks[n]:.1f}" for n in others) + " |",
              flush=True)


if __name__ == "__main__":
    main()
