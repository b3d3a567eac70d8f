"""Interpreter checks of the fused bidirectional selective scan, run by tests/test_selective_scan_triton.py in a
subprocess (Triton decides between compiling and interpreting when a kernel is defined, so
``TRITON_INTERPRET=1`` is set before anything imports ``vig_kernels.selective_scan.fused``).

Usage: ``python tests/selective_scan_interp_cases.py [GROUP ...]`` with GROUP one of ``GROUPS``; exits non-zero
on failure. Every case compares the output and all six gradients against the float64 reference with
fla-style RMS ratios: ``RMS(out - ref) / RMS(ref) < tol`` (1e-5 for fp32 inputs, 5e-3 for 16-bit ones) or
``max |out - ref| <= 1e-6``.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import interpreter_scans  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vig_kernels  # noqa: E402
from vig_kernels.selective_scan import bi_selective_scan, bi_selective_scan_reference  # noqa: E402
from vig_kernels.selective_scan.fused import bi_selective_scan_triton  # noqa: E402

NAMES = ("y", "du", "ddelta", "dA", "dB", "dC", "dD")


def vim_init(shape, gen):
    """Vim's initial steps: log-uniform in [0.001, 0.1], so states remember hundreds of tokens."""
    return torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))


def trained(shape, gen):
    return F.softplus(torch.randn(shape, generator=gen))


def strong(shape, gen):
    """Steps up to about 10 with |A| up to 16: most decays underflow to exactly 0 in fp32."""
    return F.softplus(3 * torch.randn(shape, generator=gen) + 2)


STEPS = {"vim_init": vim_init, "trained": trained, "strong": strong}


def rms_ratio(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def make_inputs(batch, length, channels, d_state, step, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(2, batch, length, channels, generator=gen)
    delta = STEPS[step]((2, batch, length, channels), gen)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(2, channels, 1)  # S4D-real, as Vim starts
    A = A * torch.exp(0.3 * torch.randn(2, channels, d_state, generator=gen))
    B, C = (torch.randn(2, batch, length, d_state, generator=gen) for _ in range(2))
    D = torch.randn(2, channels, generator=gen)
    dout = torch.randn(batch, length, channels, generator=gen)
    return (u, delta, A, B, C, D), dout


def report(desc, pairs, tol):
    failures, ratios = [], []
    for name, (a, b) in zip(NAMES, pairs):
        if not torch.isfinite(a).all():
            failures.append(f"{name} not finite")
            ratios.append(float("nan"))
            continue
        ratio = rms_ratio(a, b)
        ratios.append(ratio)
        if ratio >= tol and (a.double() - b.double()).abs().max().item() > 1e-6:
            failures.append(f"{name} ratio {ratio:.2e}")
    print(f"{'FAIL' if failures else 'ok  '} {desc}: " + " ".join(f"{n}={r:.1e}" for n, r in zip(NAMES, ratios))
          + ("  <- " + ", ".join(failures) if failures else ""), flush=True)
    return not failures


def run_case(batch, length, channels, d_state, step="trained", dtype=torch.float32, noncontiguous=False, seed=0):
    (u, delta, A, B, C, D), dout = make_inputs(batch, length, channels, d_state, step, seed)
    # 16-bit activations as Vim produces them under autocast; A and D stay fp32 as in the official scan.
    u, delta, B, C = (x.to(dtype) for x in (u, delta, B, C))
    leaves = [x.clone().requires_grad_() for x in (u, delta, A, B, C, D)]
    inputs = leaves
    if noncontiguous:  # u with a last-dim stride of 2 (copied), delta, B and C in [2, T, B, *] memory order
        inputs = [torch.stack([leaves[0], leaves[0]], -1)[..., 0]]
        inputs += [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (leaves[1],)]
        inputs += [leaves[2]] + [x.transpose(1, 2).contiguous().transpose(1, 2) for x in leaves[3:5]] + [leaves[5]]
    out = bi_selective_scan_triton(*inputs)
    (out.float() * dout).sum().backward()

    ref_leaves = [x.detach().double().requires_grad_() for x in (u, delta, A, B, C, D)]
    ref = bi_selective_scan_reference(*ref_leaves)
    (ref * dout.double()).sum().backward()
    desc = (f"B={batch} T={length} E={channels} N={d_state} step={step} dtype={str(dtype)[6:]}"
            + (" noncontiguous" if noncontiguous else ""))
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
    return report(desc, pairs, 1e-5 if dtype == torch.float32 else 5e-3)


CASES = {
    "lengths": [dict(batch=1, length=t, channels=12, d_state=16, step=step)  # one channel block
                for t, step in ((1, "trained"), (7, "vim_init"), (16, "trained"), (17, "strong"), (63, "vim_init"),
                                (197, "trained"))],
    "paths": [
        dict(batch=2, length=40, channels=24, d_state=16, step="strong"),
        dict(batch=2, length=33, channels=37, d_state=5, step="trained"),   # masked channels and states
        dict(batch=1, length=20, channels=8, d_state=1, step="vim_init"),
        dict(batch=1, length=18, channels=16, d_state=64, step="trained"),
        dict(batch=2, length=30, channels=20, d_state=16, step="trained", noncontiguous=True),
        dict(batch=1, length=35, channels=16, d_state=16, step="trained", dtype=torch.bfloat16),
        dict(batch=1, length=35, channels=16, d_state=16, step="vim_init", dtype=torch.float16),
    ],
}


def mixer_case():
    """Vim's mixer with the fused scan (backend ``triton``) against the reference path: output and every
    parameter gradient, so the kernel is checked where the model calls it."""
    from vig.vim import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(8)
    hidden = torch.randn(2, 21, 8)
    results = {}
    for backend in ("reference", "triton"):
        mixer.zero_grad()
        with vig_kernels.use_backend(backend):
            out = mixer(hidden)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in mixer.parameters()]
    worst = max(rms_ratio(a, b) for a, b in zip(results["triton"], results["reference"]))
    good = worst < 1e-5
    print(f"{'ok  ' if good else 'FAIL'} mixer: output and {len(results['triton']) - 1} parameter gradients, "
          f"largest RMS ratio against the reference path {worst:.1e}", flush=True)
    return good


def compile_case():
    """The op as torch.library sees it (opcheck: schema, fake tensors, autograd registration, AOT dispatch),
    and torch.compile(fullgraph=True) of the public, dispatching op matching eager."""
    (u, delta, A, B, C, D), _ = make_inputs(2, 19, 12, 4, "trained", seed=3)
    leaves = tuple(x.requires_grad_() for x in (u, delta, A, B, C, D))
    checks = torch.library.opcheck(torch.ops.vig_kernels.bi_selective_scan_fwd.default, leaves)
    failed = {name: result for name, result in checks.items() if result != "SUCCESS"}

    def loss(*xs):
        with vig_kernels.use_backend("triton"):  # the public op, as the models call it
            return (bi_selective_scan(*xs) ** 2).sum()

    eager = torch.autograd.grad(loss(*leaves), leaves)
    torch._dynamo.reset()
    graph = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    worst = max(rms_ratio(a, b) for a, b in zip(graph, eager))
    good = not failed and worst < 1e-6
    print(f"{'ok  ' if good else 'FAIL'} compile: opcheck {failed or 'all SUCCESS'}, compiled vs eager gradient "
          f"RMS ratio {worst:.1e}", flush=True)
    return good


def run_cases(cases):
    return all([run_case(**case) for case in cases])  # a list: every case runs and reports


GROUPS = {**{name: functools.partial(run_cases, cases) for name, cases in CASES.items()},
          "mixer": mixer_case, "compile": compile_case}


def main(groups):
    start = time.time()
    vectorised = interpreter_scans.install()
    print(f"interpreter scans: {'vectorised along the axis' if vectorised else 'Triton element loops'}", flush=True)
    ok = True
    for group in groups:
        ok &= GROUPS[group]()
    print(f"{'passed' if ok else 'FAILED'} in {time.time() - start:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(GROUPS)))
