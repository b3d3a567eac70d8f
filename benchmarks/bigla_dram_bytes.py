"""Two forward+backward calls of the fused BiGLA op at one shape, to be read by Nsight Compute's DRAM counters.

    ncu --kernel-name regex:"_fwd_kernel|_bwd_kernel" --launch-count 6 --csv \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,gpu__time_duration.sum \
        python benchmarks/bigla_dram_bytes.py 128 196 3        # batch, tokens, heads (ViG-T at 224)

The script prints the HBM floors of the shape (640 B per token-head forward, 1,152 B backward; every input
read once, every output written once), which the measured DRAM bytes are compared with in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vig_kernels.bigla.fused import bigla_triton  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("batch", type=int)
    ap.add_argument("tokens", type=int)
    ap.add_argument("heads", type=int)
    args = ap.parse_args()
    shape = (args.batch, args.tokens, args.heads)
    q, k = (torch.randn(*shape, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(*shape, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g_f, g_b = (F.logsigmoid(torch.randn(*shape, 32, device="cuda")).div(16).requires_grad_() for _ in range(2))
    do = torch.randn(*shape, 64, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call runs with the kernels compiled
        torch.autograd.grad(bigla_triton(q, k, v, g_f, g_b), (q, k, v, g_f, g_b), do)
    torch.cuda.synchronize()
    token_heads = args.batch * args.tokens * args.heads
    print(f"token-heads {token_heads}: fwd floor {token_heads * 640 / 1e6:.1f} MB, "
          f"bwd floor {token_heads * 1152 / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
