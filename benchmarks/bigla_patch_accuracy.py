"""Accuracy screen of candidate kernels before timing them: the working tree's fused BiGLA op (A) and each
patched version (B, C, ...) against the float64 reference, output and all five gradients.

    python benchmarks/bigla_patch_accuracy.py benchmarks/results/x.patch [y.patch ...]

Prints, per configuration, the largest RMS(error) / RMS(reference) over o, dq, dk, dv, dg_fwd and dg_bwd. The
configurations cover bf16 at ViG shapes (one and several segments, one and several waves), fp16 with a forced
split, and fp32 at head dims 16 and 128. Patched versions load as in ``bigla_ab.py``. Under TRITON_INTERPRET=1
it runs one tiny fp32 configuration on the CPU (a check of the script and the patches).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bigla_ab import load_as_module, other_version  # noqa: E402

from vig_kernels.bigla import fused  # noqa: E402
from vig_kernels.bigla.reference import bigla_reference  # noqa: E402

GPU_CONFIGS = [  # batch, tokens, heads, key dim, value dim, dtype, segments (None: the plan's)
    (4, 196, 3, 64, 64, torch.bfloat16, None), (8, 4096, 12, 64, 64, torch.bfloat16, None),
    (2, 1000, 2, 32, 32, torch.float16, 3), (3, 300, 2, 128, 128, torch.float32, None),
    (2, 65, 3, 16, 16, torch.float32, None), (64, 196, 6, 64, 64, torch.bfloat16, None),
]
CPU_CONFIGS = [(2, 20, 2, 16, 16, torch.float32, None)]


def worst_error(module, inputs, do, segments, ref, ref_grads) -> float:
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = module.bigla_triton(*leaves, segments=segments)
    grads = torch.autograd.grad(out, leaves, do)
    errors = [((a.double() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item()
              for a, r in zip([out, *grads], [ref, *ref_grads])]
    return float("nan") if any(e != e for e in errors) else max(errors)


def main(patches: list[str]) -> None:
    device = "cpu" if os.environ.get("TRITON_INTERPRET") else "cuda"
    versions = {"A": fused}
    for i, patch in enumerate(patches):
        versions[chr(ord("B") + i)] = load_as_module(other_version(None, patch), f"bigla_accuracy_other{i}")
    print("A = working tree, " + ", ".join(f"{name} = + {patch}" for name, patch in zip(list(versions)[1:], patches)))
    print("| batch, tokens, heads, K, V, dtype, segments | " + " | ".join(versions) + " |")
    print("|---" * (1 + len(versions)) + "|")
    torch.manual_seed(0)
    for batch, tokens, heads, key_dim, value_dim, dtype, segments in \
            (CPU_CONFIGS if device == "cpu" else GPU_CONFIGS):
        q, k = (torch.randn(batch, tokens, heads, key_dim, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(batch, tokens, heads, value_dim, device=device, dtype=dtype)
        gates = [F.logsigmoid(torch.randn(batch, tokens, heads, key_dim, device=device)) / 4 for _ in range(2)]
        inputs = [q, k, v, *gates]
        do = torch.randn(batch, tokens, heads, value_dim, device=device, dtype=dtype)
        ref_leaves = [x.double().requires_grad_() for x in inputs]
        ref = bigla_reference(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
        errors = [worst_error(module, inputs, do, segments, ref, ref_grads) for module in versions.values()]
        print(f"| {batch}, {tokens}, {heads}, {key_dim}, {value_dim}, {str(dtype).removeprefix('torch.')}, "
              f"{segments} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
