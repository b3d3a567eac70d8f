"""Registers, spills and SASS instructions per chunk step of the selective-scan kernels, compiled for sm_90 by
Triton's ptxas (no GPU needed), with the source lines that cost most (``bigla_sass.py``'s tools).

    python benchmarks/selective_scan_sass.py                       # Vim-T 197 tokens, the launcher's settings
    python benchmarks/selective_scan_sass.py --block-e 32 --warps 8 --tokens 1025
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bigla_sass import compile_kernel, report  # noqa: E402

from vig_kernels.selective_scan import fused  # noqa: E402

STRIDE = 384  # every integer argument: a multiple of 16, as Vim-T's channel strides are


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--block-e", type=int, help="channels per program (default: the launcher's per kernel)")
    ap.add_argument("--warps", type=int, help="warps per program (default: the launcher's per kernel)")
    ap.add_argument("--lines", type=int, default=12, help="source lines shown per loop")
    args = ap.parse_args()
    constexprs = dict(N_CHUNKS=-(-args.tokens // fused.CHUNK), CH=fused.CHUNK,
                      BLOCK_N=max(1 << (args.d_state - 1).bit_length(), 2))
    kernels = {
        "forward": (fused._bi_scan_fwd_kernel, fused.FWD_BLOCK_E, fused.FWD_WARPS, ("u_ptr", "B_ptr", "C_ptr")),
        "backward": (fused._bi_scan_bwd_kernel, fused.BWD_BLOCK_E, fused.BWD_WARPS,
                     ("u_ptr", "B_ptr", "C_ptr", "dout_ptr")),
    }
    for name, (kernel, block_e, warps, bf16_pointers) in kernels.items():
        pointers = {arg: "*bf16" if arg in bf16_pointers else "*fp32" for arg in kernel.arg_names
                    if arg.endswith("_ptr")}
        integers = {arg: STRIDE for arg in kernel.arg_names if arg not in pointers and arg not in constexprs
                    and arg != "BLOCK_E"}
        compiled = compile_kernel(kernel, pointers, integers, (), dict(constexprs, BLOCK_E=args.block_e or block_e),
                                  args.warps or warps, None)
        report(f"{name} (BLOCK_E={args.block_e or block_e}, {args.warps or warps} warps)", compiled, args.lines)


if __name__ == "__main__":
    main()
