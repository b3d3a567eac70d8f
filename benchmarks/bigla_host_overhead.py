"""Host time per call of the fused BiGLA op's entry points, on inputs so small that the GPU work is negligible.

    python benchmarks/bigla_host_overhead.py

Compares the kernel launcher alone, the eager entry point (``bigla_triton``: an ``autograd.Function``) and
the ``torch.library`` op that ``torch.compile`` sees (``torch.ops.vig_kernels.bigla_fwd``), without and
with autograd. The difference is why eager calls bypass the dispatcher (docs/kernels.md).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vig_kernels.bigla import fused  # noqa: E402


def microseconds_per_call(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    q, k = (torch.randn(1, 16, 1, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g_f, g_b = (torch.full((1, 16, 1, 32), -0.05, device="cuda", requires_grad=True) for _ in range(2))
    leaves = (q, k, v, g_f, g_b)
    do = torch.ones_like(v)
    plan = fused._plan(1, 16, 32, 64, q.device)
    op = torch.ops.vig_kernels.bigla_fwd

    with torch.no_grad():
        launcher = microseconds_per_call(lambda: fused._forward(*leaves, 0.2, plan))
        eager = microseconds_per_call(lambda: fused.bigla_triton(*leaves))
        registered = microseconds_per_call(lambda: op(*leaves, 0.2, 0))
    eager_fb = microseconds_per_call(lambda: torch.autograd.grad(fused.bigla_triton(*leaves), leaves, do), 1000)
    registered_fb = microseconds_per_call(lambda: torch.autograd.grad(op(*leaves, 0.2, 0)[0], leaves, do), 1000)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n"
          "| host µs per call | launcher | eager entry (no grad) | torch.library op (no grad) | "
          "eager fwd+bwd | torch.library op fwd+bwd |\n|---|---|---|---|---|---|\n"
          f"| | {launcher:.1f} | {eager:.1f} | {registered:.1f} | {eager_fb:.1f} | {registered_fb:.1f} |")


if __name__ == "__main__":
    main()
