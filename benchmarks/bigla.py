"""Benchmark of the fused bidirectional GLA against the official training path, SDPA and the HBM floor.

    python benchmarks/bigla.py                      # all ViG shapes, writes benchmarks/results/bigla.md
    python benchmarks/bigla.py --shapes quick       # three representative shapes
    python benchmarks/bigla.py --configs 4:4,4:8 --shapes quick --no-baselines   # tuning sweep
    python benchmarks/bigla.py --graphs --models ViG-B   # one model's rows (finishing a table that ran out of
                                                         # time: markdown_table() formats the JSON lines)

Per shape (ViG-T/S/B heads, d_k = 32, d_v = 64; bf16 q, k, v, o; fp32 log-gates ``logsigmoid(z)/16``):
(a) this kernel, ``vig_kernels.bigla.fused.bigla_triton``;
(b) the official ViG training path on fla (``chunk_gla`` on ``[x; flip(x)]`` along the batch, gates
    ``[g_f; flip(g_b)]``, output ``(o_f + flip(o_b)) / 2``), when ``fla`` is importable;
(c) ``scaled_dot_product_attention`` (non-causal, default backend) on ``[B, H, T, 64]`` bf16;
(d) the HBM floor of the fused op: 640 B per token-head forward and 1,152 B backward (every input read once,
    every output written once) over the copy bandwidth measured in the same run.
Times are ``triton.testing.do_bench`` medians (it zeroes a 256 MB buffer before each repetition, which flushes
L2); on top, each timed call takes the next of several input sets, rotated so the sets together exceed twice
the L2 size. fwd+bwd is one forward plus ``torch.autograd.grad`` with a fixed random upstream gradient (no
``.grad`` accumulation); peak = max allocated during one fwd+bwd minus the allocation before it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vig_kernels.bigla import fused  # noqa: E402
from vig_kernels.bigla.reference import bigla_reference  # noqa: E402

try:
    import fla  # noqa: E402
    from fla.ops.gla import chunk_gla  # noqa: E402
    FLA_VERSION = getattr(fla, "__version__", "?")
except Exception as exc:  # pragma: no cover - optional baseline
    chunk_gla = None
    FLA_VERSION = f"not importable ({type(exc).__name__})"

MODELS = {"ViG-T": 3, "ViG-S": 6, "ViG-B": 12}
SETTINGS = [(196, 128), (196, 256), (1024, 32), (4096, 8)]  # (tokens, batch)
QUICK = [("ViG-T", 196, 128), ("ViG-B", 1024, 32), ("ViG-T", 4096, 8)]
KEY_DIM, VALUE_DIM = 32, 64


def fwd_bytes(key_dim=KEY_DIM, value_dim=VALUE_DIM):
    return 2 * (2 * key_dim + 2 * value_dim) + 2 * 4 * key_dim  # q, k, v, o bf16; two fp32 gates


def bwd_bytes(key_dim=KEY_DIM, value_dim=VALUE_DIM):
    reads = 2 * (2 * key_dim + 2 * value_dim) + 2 * 4 * key_dim      # q, k, v, do; gates
    writes = 2 * (2 * key_dim + value_dim) + 2 * 4 * key_dim         # dq, dk, dv; dgates
    return reads + writes


def fla_path(q, k, v, g_fwd, g_bwd):
    """The official ViG training path: both directions as one chunk_gla call on the stacked batch."""
    qq = torch.cat([q, q.flip(1)], 0)
    kk = torch.cat([k, k.flip(1)], 0)
    vv = torch.cat([v, v.flip(1)], 0)
    gg = torch.cat([g_fwd, g_bwd.flip(1)], 0)
    o, _ = chunk_gla(qq, kk, vv, gg)
    o_f, o_b = o.chunk(2, 0)
    return (o_f + o_b.flip(1)) / 2


def ours(q, k, v, g_fwd, g_bwd):
    return fused.bigla_triton(q, k, v, g_fwd, g_bwd)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def make_gla_inputs(batch, length, heads, device, grad):
    q, k = (torch.randn(batch, length, heads, KEY_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, length, heads, VALUE_DIM, device=device, dtype=torch.bfloat16)
    g_f, g_b = (F.logsigmoid(torch.randn(batch, length, heads, KEY_DIM, device=device)) / 16 for _ in range(2))
    xs = [q, k, v, g_f, g_b]
    return [x.requires_grad_(grad) for x in xs]


def make_sdpa_inputs(batch, length, heads, device, grad):
    return [torch.randn(batch, heads, length, 64, device=device, dtype=torch.bfloat16).requires_grad_(grad)
            for _ in range(3)]


def n_sets(bytes_per_set, l2_bytes):
    return max(1, min(8, math.ceil(2 * l2_bytes / max(bytes_per_set, 1))))


def bench(fn, make, sets, rep_ms, backward):
    """Median ms of fn over rotated input sets (forward under no_grad, or forward + autograd.grad)."""
    inputs = [make(backward) for _ in range(sets)]
    if backward:
        grads = []
        with torch.no_grad():
            for xs in inputs:
                out = fn(*xs)
                grads.append(torch.randn_like(out))
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % sets
        xs = inputs[i]
        if backward:
            out = fn(*xs)
            torch.autograd.grad(out, xs, grads[i])
        else:
            with torch.no_grad():
                fn(*xs)

    ms = do_bench(step, warmup=25, rep=rep_ms, return_mode="median")
    del inputs
    return ms


def bench_graph(fn, make, sets, rep_ms, backward):
    """Median ms per call of fn with launch overhead removed: the calls on all rotated input sets are
    captured in one CUDA graph, whose replay is timed with do_bench (L2 flushed before each replay)."""
    inputs = [make(backward) for _ in range(sets)]
    grads = []
    if backward:
        with torch.no_grad():
            grads = [torch.randn_like(fn(*xs)) for xs in inputs]

    def body():
        for i, xs in enumerate(inputs):
            if backward:
                torch.autograd.grad(fn(*xs), xs, grads[i])
            else:
                with torch.no_grad():
                    fn(*xs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    ms = do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median") / sets
    del graph, inputs
    return ms


def peak_mib(fn, make):
    xs = make(True)
    out = fn(*xs)
    grad = torch.randn_like(out)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*xs)
    torch.autograd.grad(out, xs, grad)
    del out
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth():
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    del x, y
    return 2 * 2**30 / (ms * 1e-3)  # bytes read + written per second


def rms_ratio(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def check(heads, length, device):
    """RMS ratio of ours and of the fla path against the fp32 reference on a small batch."""
    xs = make_gla_inputs(2, length, heads, device, False)
    ref = bigla_reference(*xs)
    res = {"ours": rms_ratio(ours(*xs), ref)}
    if chunk_gla is not None:
        res["fla"] = rms_ratio(fla_path(*xs), ref)
    return res


def set_config(cfg):
    """fwd_warps:bwd_warps[:value_block[:bwd_programs_per_sm[:num_stages[:fwd_maxnreg[:bwd_maxnreg]]]]],
    0 = default (bwd_programs_per_sm: what the segment plan assumes fits per SM)."""
    vals = [int(x) for x in cfg.split(":")] + [0] * 5
    fused.FWD_WARPS, fused.BWD_WARPS = vals[:2]
    fused.VALUE_BLOCK = vals[2] or None
    fused.BWD_PROGRAMS_PER_SM = vals[3] or 2
    fused.NUM_STAGES = vals[4] or None
    fused.FWD_MAX_REGISTERS = vals[5] or None
    fused.BWD_MAX_REGISTERS = vals[6] or None


def current_config():
    return (f"warps fwd {fused.FWD_WARPS} / bwd {fused.BWD_WARPS}, value block "
            f"{fused.VALUE_BLOCK or 'auto'}, backward programs/SM {fused.BWD_PROGRAMS_PER_SM}, stages "
            f"{fused.NUM_STAGES or 'default'}, register cap fwd {fused.FWD_MAX_REGISTERS or 'none'} / bwd "
            f"{fused.BWD_MAX_REGISTERS or 'none'}")


def markdown_table(header: str, results: list[dict]) -> str:
    """The table of BENCHMARKS.md from result rows (the JSON lines a run prints)."""
    def fmt(x, scale=1e3, nd=1):
        return "-" if x is None else f"{x * scale:.{nd}f}"

    lines = [header, "",
             "Times in µs (medians), peak in MiB; ratios > 1 mean ours is faster / smaller. "
             "fwd/floor: our forward over the fused forward HBM floor.", "",
             "| model | T | B | ours fwd | ours f+b | ours peak | fla fwd | fla f+b | fla peak | SDPA fwd | SDPA f+b "
             "| SDPA peak | floor fwd | floor f+b | fwd/floor | fla f+b / ours | SDPA f+b / ours | fla peak / ours "
             "| err ours | err fla |",
             "|" + "---|" * 20]
    for r in results:
        g = r.get
        ratio = lambda a, b: "-" if g(a) is None or g(b) is None else f"{g(a) / g(b):.2f}"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['T']} | {r['B']} | {fmt(g('ours_fwd'))} | {fmt(g('ours_fb'))} | "
            f"{fmt(g('ours_peak'), 1)} | {fmt(g('fla_fwd'))} | {fmt(g('fla_fb'))} | {fmt(g('fla_peak'), 1)} | "
            f"{fmt(g('sdpa_fwd'))} | {fmt(g('sdpa_fb'))} | {fmt(g('sdpa_peak'), 1)} | {fmt(g('floor_fwd'))} | "
            f"{fmt(g('floor_fb'))} | {ratio('ours_fwd', 'floor_fwd')} | {ratio('fla_fb', 'ours_fb')} | "
            f"{ratio('sdpa_fb', 'ours_fb')} | {ratio('fla_peak', 'ours_peak')} | {g('err_ours', 0):.1e} | "
            f"{g('err_fla', float('nan')):.1e} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", choices=["all", "quick"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="models of the full table (e.g. to finish a table that ran out of time)")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--configs", default=None,
                    help="fwd_warps:bwd_warps[:bv[:pps[:stages[:fwd_maxnreg[:bwd_maxnreg]]]]],... sweep")
    ap.add_argument("--then-full", action="store_true", help="after the sweep, run the full table with the best")
    ap.add_argument("--config", default=None, help="configuration of ours for the table")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (no launch overhead) "
                    "instead of eager calls")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bigla.md"))
    args = ap.parse_args()

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bandwidth = copy_bandwidth()
    shapes = QUICK if args.shapes == "quick" else [(m, t, b) for m in args.models for (t, b) in SETTINGS]
    header = (f"device: {props.name} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB), "
              f"date: {datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"fla {FLA_VERSION}, python {platform.python_version()}; measured copy bandwidth "
              f"{bandwidth / 1e12:.3f} TB/s")
    print(header, flush=True)

    timer = bench_graph if args.graphs else bench
    if args.configs:
        rows = []
        for model, length, batch in shapes:
            heads = MODELS[model]
            make = lambda grad, b=batch, t=length, h=heads: make_gla_inputs(b, t, h, device, grad)  # noqa: E731
            sets = n_sets(batch * length * heads * fwd_bytes(), l2)
            for cfg in args.configs.split(","):
                set_config(cfg)
                try:
                    f = timer(ours, make, sets, args.rep, False)
                    fb = timer(ours, make, sets, args.rep, True)
                except Exception as exc:  # a configuration that does not compile or fit
                    print(f"{model} T={length} B={batch} cfg={cfg}: failed: {type(exc).__name__}: {exc}"[:300])
                    rows.append((model, length, batch, cfg, float("inf"), float("inf")))
                    continue
                rows.append((model, length, batch, cfg, f, fb))
                diag = " ".join(f"{name}: {getattr(kern, 'n_regs', '?')} regs, {getattr(kern, 'n_spills', '?')} spills"
                                for name, kern in fused.LAST_LAUNCH.items())
                print(f"{model} T={length} B={batch} cfg={cfg}: fwd {f * 1e3:.1f} us, fwd+bwd {fb * 1e3:.1f} us "
                      f"[plan {fused._plan(batch * heads, length, KEY_DIM, VALUE_DIM, device)}; {diag}]", flush=True)
                fused.LAST_LAUNCH.clear()
        print("\n| model | T | B | fwd_warps:bwd_warps[:bv:pps:stages:fwd_maxnreg:bwd_maxnreg] | fwd us | "
              "fwd+bwd us |\n"
              "|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4] * 1e3:.1f} | {r[5] * 1e3:.1f} |")
        if not args.then_full:
            return
        # best = smallest sum over shapes of fwd+bwd time relative to the first configuration
        configs = args.configs.split(",")
        base = {(r[0], r[1]): r[5] for r in rows if r[3] == configs[0]}
        score = {c: sum(r[5] / base[(r[0], r[1])] for r in rows if r[3] == c) for c in configs}
        best = min(configs, key=score.get)
        print(f"best configuration: {best} (relative fwd+bwd scores {score})", flush=True)
        set_config(best)
        shapes = [(m, t, b) for m in args.models for (t, b) in SETTINGS]
    elif args.config:
        set_config(args.config)
    header += f"; ours: {current_config()}; timing: {'CUDA-graph replay' if args.graphs else 'eager calls'}"

    results = []
    for model, length, batch in shapes:
        heads = MODELS[model]
        token_heads = batch * length * heads
        make = lambda grad, b=batch, t=length, h=heads: make_gla_inputs(b, t, h, device, grad)  # noqa: E731
        make_s = lambda grad, b=batch, t=length, h=heads: make_sdpa_inputs(b, t, h, device, grad)  # noqa: E731
        sets = n_sets(token_heads * fwd_bytes(), l2)
        started = time.perf_counter()
        r = {"model": model, "T": length, "B": batch, "H": heads,
             "floor_fwd": token_heads * fwd_bytes() / bandwidth * 1e3,
             "floor_fb": token_heads * (fwd_bytes() + bwd_bytes()) / bandwidth * 1e3}
        r.update({f"err_{k}": v for k, v in check(heads, length, device).items()})

        def timed(key, fn, mk, backward):
            try:
                r[key] = timer(fn, mk, sets, args.rep, backward)
            except Exception as exc:  # e.g. a baseline that cannot be captured in a graph
                print(f"{model} T={length} B={batch} {key}: {type(exc).__name__}: {exc}"[:300], flush=True)
                torch.cuda.synchronize()

        timed("ours_fwd", ours, make, False)
        timed("ours_fb", ours, make, True)
        r["ours_peak"] = peak_mib(ours, make)
        if not args.no_baselines:
            if chunk_gla is not None:
                timed("fla_fwd", fla_path, make, False)
                timed("fla_fb", fla_path, make, True)
                r["fla_peak"] = peak_mib(fla_path, make)
            timed("sdpa_fwd", sdpa, make_s, False)
            timed("sdpa_fb", sdpa, make_s, True)
            r["sdpa_peak"] = peak_mib(sdpa, make_s)
        r["wall_s"] = round(time.perf_counter() - started, 1)  # compiles and autotuning included: plans device time
        results.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()

    table = markdown_table(header, results)
    print("\n" + table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(table + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"header": header, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
