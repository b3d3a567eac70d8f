"""Interpreter checks of the fused BiGLA kernels, run by tests/test_bigla_triton.py in a subprocess.

Triton decides between compiling and interpreting when a kernel is defined (module import), so these cases
run in a fresh process with ``TRITON_INTERPRET=1`` set before anything imports ``vig_kernels.bigla.fused``.
Usage: ``python tests/bigla_interp_cases.py GROUP`` with GROUP one of ``GROUPS`` (the ``CASES`` and
``compile``); exits non-zero on failure.
Every case compares output and all five gradients (fp32 kernel in the interpreter) against the float64
reference with fla-style RMS ratios: ``RMS(out - ref) / RMS(ref) < tol`` or ``max |out - ref| <= 1e-6``.
"""
from __future__ import annotations

import functools
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vig_kernels  # noqa: E402
from vig_kernels.bigla import bigla, fused  # noqa: E402
from vig_kernels.bigla.fused import GATE_MIN, bigla_triton  # noqa: E402
from vig_kernels.bigla.reference import bigla_reference  # noqa: E402

TOL = 1e-5
LENGTHS = (1, 7, 63, 64, 65, 196, 300)


def weak(z):   # ViG's gate: about -0.04 nats per token at z = 0
    return F.logsigmoid(z) / 16


def typical(z):
    return F.logsigmoid(z)


def strong(z):  # down to about -40 nats per token: exercises the clamp at GATE_MIN
    return F.logsigmoid(10 * z)


def saturated(z):  # every gate far below the clamp
    return torch.full_like(z, -100.0)


GATES = {"weak": weak, "typical": typical, "strong": strong, "saturated": saturated}


def rms_ratio(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def run_case(batch, length, heads, key_dim, value_dim, gate="weak", segments=None,
             noncontiguous=False, seed=0, forward_group=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, key_dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, generator=gen)
    g_f, g_b = (GATES[gate](torch.randn(batch, length, heads, key_dim, generator=gen)) for _ in range(2))
    do = torch.randn(batch, length, heads, value_dim, generator=gen)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, g_f, g_b)]
    inputs = leaves
    if noncontiguous:  # q, k, v with a last-dim stride of 2; gates in [B, H, T, K] memory order
        inputs = [torch.stack([x, x], -1)[..., 0] for x in leaves[:3]]
        inputs += [x.transpose(1, 2).contiguous().transpose(1, 2) for x in leaves[3:]]
    with fused.forward_segments_per_program(forward_group):
        out = bigla_triton(*inputs, segments=segments)
    (out * do).sum().backward()

    ref_leaves = [x.double().clone().requires_grad_() for x in (q, k, v, g_f, g_b)]
    # the kernel clamps the gates to [GATE_MIN, 0]; torch.clamp has the same zero gradient outside
    ref = bigla_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2],
                          ref_leaves[3].clamp(GATE_MIN, 0), ref_leaves[4].clamp(GATE_MIN, 0))
    (ref * do.double()).sum().backward()

    failures = []
    names = ("o", "dq", "dk", "dv", "dg_fwd", "dg_bwd")
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
    ratios = []
    for name, (a, b) in zip(names, pairs):
        if not torch.isfinite(a).all():
            failures.append(f"{name} not finite")
            ratios.append(float("nan"))
            continue
        r = rms_ratio(a, b)
        ratios.append(r)
        if r >= TOL and (a.double() - b.double()).abs().max().item() > 1e-6:
            failures.append(f"{name} ratio {r:.2e}")
    desc = (f"B={batch} T={length} H={heads} K={key_dim} V={value_dim} gate={gate} "
            f"segments={segments} noncontiguous={noncontiguous}"
            + (f" forward_group={forward_group}" if forward_group else ""))
    print(f"{'FAIL' if failures else 'ok  '} {desc}: " + " ".join(f"{n}={r:.1e}" for n, r in zip(names, ratios))
          + ("  <- " + ", ".join(failures) if failures else ""), flush=True)
    return not failures


def _lengths(key_dim, value_dim, gate, lengths=LENGTHS, **kw):
    return [dict(batch=1, length=t, heads=1, key_dim=key_dim, value_dim=value_dim, gate=gate, **kw)
            for t in lengths]


CASES = {
    # every required length at ViG-H's and ViG's head dims, weak and strong gates
    "dim16": _lengths(16, 32, "weak") + _lengths(16, 32, "strong", lengths=(7, 65, 196)),
    "dim32": _lengths(32, 64, "weak") + _lengths(32, 64, "strong", lengths=(1, 64, 300)),
    "dim64": _lengths(64, 64, "weak", lengths=(1, 7, 63, 64, 65, 196)) + _lengths(64, 64, "strong", lengths=(65,)),
    # the other code paths: segments (long-sequence path), value blocks (NV > 1), layouts
    "paths": [
        dict(batch=1, length=300, heads=1, key_dim=32, value_dim=64, gate="strong", segments=5),
        dict(batch=1, length=130, heads=1, key_dim=16, value_dim=32, gate="typical", segments=9),
        dict(batch=1, length=100, heads=1, key_dim=16, value_dim=32, gate="saturated"),
        dict(batch=1, length=300, heads=1, key_dim=16, value_dim=32, gate="typical", segments=3),
        dict(batch=1, length=196, heads=1, key_dim=32, value_dim=64, gate="strong", segments=4),
        dict(batch=1, length=70, heads=1, key_dim=128, value_dim=128, gate="weak"),
        dict(batch=1, length=70, heads=1, key_dim=64, value_dim=16, gate="weak", segments=2),
        dict(batch=2, length=90, heads=2, key_dim=64, value_dim=128, gate="typical", segments=3),
        dict(batch=2, length=40, heads=3, key_dim=32, value_dim=64, gate="weak", noncontiguous=True),
        # 9 programs on the interpreter's 4 "SMs": the register-capped backward and its schedule
        dict(batch=3, length=65, heads=3, key_dim=32, value_dim=64, gate="strong", segments=1),
        # forward programs that own several consecutive segments
        dict(batch=2, length=300, heads=1, key_dim=32, value_dim=64, gate="strong", segments=4, forward_group=2),
        dict(batch=1, length=190, heads=2, key_dim=16, value_dim=32, gate="typical", segments=6, forward_group=3),
        dict(batch=2, length=90, heads=2, key_dim=64, value_dim=128, gate="typical", segments=3, forward_group=3),
    ],
}


def compile_cases():
    """The op as torch.library sees it: opcheck's schema, fake-tensor, autograd-registration and AOT-dispatch
    tests, and torch.compile(fullgraph=True) matching eager, for a one-segment plan (through the public,
    dispatching ``bigla``) and a segmented one."""
    ok = True
    for segments in (0, 3):
        gen = torch.Generator().manual_seed(segments)
        q, k = (torch.randn(2, 70, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
        v = torch.randn(2, 70, 2, 32, generator=gen, requires_grad=True)
        g_f, g_b = (weak(torch.randn(2, 70, 2, 16, generator=gen)).requires_grad_() for _ in range(2))
        args = (q, k, v, g_f, g_b, 0.25, segments)
        report = torch.library.opcheck(torch.ops.vig_kernels.bigla_fwd.default, args)
        failed = {name: result for name, result in report.items() if result != "SUCCESS"}

        def loss(*leaves):
            if segments:
                return (bigla_triton(*leaves, scale=0.25, segments=segments) ** 2).sum()
            with vig_kernels.use_backend("triton"):  # the public op, as the models call it
                return (bigla(*leaves, scale=0.25) ** 2).sum()

        leaves = (q, k, v, g_f, g_b)
        eager = torch.autograd.grad(loss(*leaves), leaves)
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        graph = torch.autograd.grad(compiled(*leaves), leaves)
        worst = max(rms_ratio(a, b) for a, b in zip(graph, eager))
        good = not failed and worst < 1e-6
        print(f"{'ok  ' if good else 'FAIL'} compile segments={segments}: opcheck "
              f"{failed or 'all SUCCESS'}, compiled vs eager gradient RMS ratio {worst:.1e}", flush=True)
        ok &= good
    ok &= double_backward_is_refused()
    return ok


def double_backward_is_refused():
    """The kernel's backward is not itself differentiable: a gradient of a gradient (a gradient penalty) must
    fail, not come out silently zero."""
    leaves = [x.requires_grad_() for x in (torch.randn(1, 20, 1, 16) for _ in range(3))]
    q, k, v = leaves
    gates = [weak(torch.randn(1, 20, 1, 16)).requires_grad_() for _ in range(2)]
    with vig_kernels.use_backend("triton"):
        out = bigla(q, k, v, *gates)
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    try:
        dq.pow(2).sum().backward()
        refused = False
    except RuntimeError as error:
        refused = "once_differentiable" in str(error)
    print(f"{'ok  ' if refused else 'FAIL'} double backward through the kernel is refused", flush=True)
    return refused


def run_cases(cases):
    return all([run_case(**case) for case in cases])  # a list: every case runs and reports


GROUPS = {**{name: functools.partial(run_cases, cases) for name, cases in CASES.items()}, "compile": compile_cases}


def main(groups):
    start = time.time()
    ok = True
    for group in groups:
        ok &= GROUPS[group]()
    print(f"{'passed' if ok else 'FAILED'} in {time.time() - start:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(GROUPS)))
