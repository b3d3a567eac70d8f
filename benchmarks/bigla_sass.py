"""What the fused BiGLA kernels compile to on Hopper, without a GPU: registers, spill stack, shared memory and
the SASS instruction mix of every chunk loop, optionally per source line.

    python benchmarks/bigla_sass.py                           # ViG-T heads at 196 tokens, bf16, both kernels
    python benchmarks/bigla_sass.py --tokens 4096 --segments 11 --lines 15

Triton compiles for sm_90 with the ptxas, nvdisasm and cuobjdump that ship in its wheel, so this runs on a CPU
machine. The arguments are specialised as the launcher's would be for contiguous [B, T, H, D] tensors
(pointers and integers that are multiples of 16 get Triton's divisibility hint); for the v3 kernels this
reproduced the register counts measured on the H200 (forward 143, backward 255 with a spill stack). A loop is a backward
branch spanning more than 20 instructions; its count is what one warp issues per chunk step. The per-line
attribution follows the line table, file by file: inlined helpers keep their own files, and Triton's scans and
reductions show as lines of triton/language/standard.py (``_sum_combine``, ``sum``, ``cumsum``). Findings are
in docs/kernels.md.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vig_kernels.bigla import fused  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# LDS also counts LDSM (ldmatrix) loads; HGMMA are Hopper's warpgroup MMAs (wgmma, which Triton emits for dots of
# 64 or more rows); LDL and STL are spill loads and stores
FAMILIES = ("SHFL", "BAR", "LDS", "STS", "HMMA", "HGMMA", "MUFU", "LDL", "STL")
OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def compile_kernel(kernel, pointers: dict, integers: dict, floats: tuple, constexprs: dict, num_warps: int,
                   max_registers: int | None):
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if integers[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps}
    if max_registers:
        options["maxnreg"] = max_registers
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def disassemble(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", "-g", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return registers, stack, sass.splitlines()


def loops(sass):
    """(first, last) line index of each loop: a backward branch to a label more than 20 lines up."""
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line)}
    found = []
    for i, line in enumerate(sass):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i - 20:
            found.append((labels[target.group(1)], i))
    return found


def profile(sass, first, last):
    """Opcode counts and instruction counts per source line ((file, line), None where the line table has none)
    between two SASS lines. Inlined helpers, Triton's own scans and reductions among them, keep their files."""
    opcodes, per_line, line_opcodes = collections.Counter(), collections.Counter(), {}
    source_line = None
    for text in sass[first:last + 1]:
        where = re.search(r'## File "(.*)", line (\d+)', text)
        if where:
            source_line = (where.group(1), int(where.group(2)))
            continue
        match = OPCODE.match(text)
        if match:
            opcodes[match.group(1)] += 1
            per_line[source_line] += 1
            line_opcodes.setdefault(source_line, collections.Counter())[match.group(1)] += 1
    return opcodes, per_line, line_opcodes


@functools.lru_cache(maxsize=None)
def source_lines(path: str) -> list[str]:
    return open(path).read().splitlines() if os.path.isfile(path) else []


def describe(source_line) -> str:
    """``file:line: text`` of a line-table entry."""
    if source_line is None:
        return "?"
    path, line = source_line
    lines = source_lines(path)
    text = lines[line - 1].strip()[:70] if 0 < line <= len(lines) else ""
    return f"{os.path.basename(path)}:{line}: {text}"


def report(name, compiled, show_lines: int):
    registers, stack, sass = disassemble(compiled)
    total = sum(1 for line in sass if OPCODE.match(line))
    print(f"{name}: {registers} registers, {stack} B spill stack, {compiled.metadata.shared} B shared memory, "
          f"{total} SASS instructions")
    for first, last in loops(sass):
        opcodes, per_line, line_opcodes = profile(sass, first, last)
        families = ", ".join(f"{family} {sum(n for op, n in opcodes.items() if op.startswith(family))}"
                             for family in FAMILIES)
        mix = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(10))
        print(f"  loop of {sum(opcodes.values())} instructions per warp per step ({families}): {mix}")
        for line, count in per_line.most_common(show_lines):
            ops = ", ".join(f"{op} {n}" for op, n in line_opcodes[line].most_common(4))
            print(f"    {count:5d}  {describe(line)}  [{ops}]")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--key-dim", type=int, default=32)
    ap.add_argument("--value-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--segments", type=int, default=1, help="segments per sequence (1: no segment exchange)")
    ap.add_argument("--forward-group", type=int, default=1, help="segments per forward program (divides --segments)")
    ap.add_argument("--fwd-max-registers", type=int, default=fused.FWD_MAX_REGISTERS)
    ap.add_argument("--bwd-max-registers", type=int, default=None,
                    help=f"ptxas register cap of the backward (the launcher applies {fused.BWD_MAX_REGISTERS} "
                         "only when that makes one wave of two)")
    ap.add_argument("--lines", type=int, default=0, help="show the N source lines with most instructions per loop")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    B, T, H, K, V = args.batch, args.tokens, args.heads, args.key_dim, args.value_dim
    bt, bv, nv, ns, cps, _ = fused._plan(B * H, T, K, V, torch.device("cpu"), segments=args.segments)
    dot, prec, stash_dtype = fused._dot_types(dtype)
    qk_strides = {"b": T * H * K, "t": H * K, "h": K}
    v_strides = {"b": T * H * V, "t": H * V, "h": V}
    data, gate, stash = POINTER_TYPES[dtype], "*fp32", POINTER_TYPES[stash_dtype]
    shared = dict(K=K, DV=V, BV=bv, BT=bt, NS=ns, CPS=cps, DOT=dot, PREC=prec, PHASE=0)
    forward = dict(shared, SUB=args.forward_group)
    print(f"B={B} T={T} H={H} K={K} V={V} {args.dtype}: chunk {bt}, value block {bv}, {ns} segment(s) of {cps} "
          f"chunks, {args.forward_group} per forward program, triton {triton.__version__}, sm_90")

    def integers(prefixes_qk, prefixes_v, extra=()):
        values = {"T": T, "H": H, **dict.fromkeys(extra, 0)}
        for prefix in prefixes_qk:
            values.update({f"{prefix}_{axis}": stride for axis, stride in qk_strides.items()})
        for prefix in prefixes_v:
            values.update({f"{prefix}_{axis}": stride for axis, stride in v_strides.items()})
        return values

    # pointers a kernel does not take are ignored (some candidate patches add or drop one)
    fwd_pointers = dict(Q=data, Kp=data, V=data, GF=gate, GB=gate, O=data, STASH=stash, GSUM=gate, SUF=gate,
                        HF=gate, HB=gate, GTF=gate, GTB=gate, SYNC="*i32")
    compiled = compile_kernel(fused._fwd_kernel, fwd_pointers, integers(("sq", "sk", "sf", "sg"), ("sv", "so")),
                              ("qscale",), forward, fused.FWD_WARPS, args.fwd_max_registers)
    report("forward", compiled, args.lines)

    bwd_pointers = dict(Q=data, Kp=data, V=data, GF=gate, GB=gate, DO=data, DQ=data, DK=data, DVp=data,
                        DGF=gate, DGB=gate, STASH=stash, GSUM=gate, SUF=gate, HF=gate, HB=gate, DSF=gate, DSB=gate,
                        GTF=gate, GTB=gate, SYNC="*i32")
    bwd_integers = integers(("sq", "sk", "sf", "sg", "sdq", "sdk", "sdf", "sdg"), ("sv", "sd", "sdv"),
                            extra=("part_stride",))
    compiled = compile_kernel(fused._bwd_kernel, bwd_pointers, bwd_integers, ("qscale",),
                              dict(shared, CAPPED=args.bwd_max_registers is not None),
                              fused.BWD_WARPS, args.bwd_max_registers)
    report("backward", compiled, args.lines)


if __name__ == "__main__":
    main()
