"""Target program for Nsight Compute: the CUDA coded-decode kernel (and the Triton lean loop it replaced) at one
benchmark shape, a few launches each. Run on the GPU machine, e.g.

    ncu -k regex:antkv_coded_warp -c 1 --set full python benchmarks/ncu_coded_decode.py --bits 1 --ctx 131072 --batch 32

(kernels/NOTES.md "Coded decode, CUDA C++ (post-RoPE LUT)" and "Value-copy selection words" quote what it
reported). ``--coded triton`` profiles the Triton loop instead; ``--rope VARIANT`` the pre-RoPE pair-layout kernel
(``ncu -k regex:antkv_rope_coded ...``) on the same codes.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_bench import _rope_fn, decode_inputs, rope_inputs  # noqa: E402

from antkv_compile.kernels import decode_attention as DA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="1")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--coded", default="cuda", choices=["cuda", "triton"])
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--select", action="store_true", help="pass the value-copy selection words (v8)")
    ap.add_argument("--rope", default="", help="a kernels_bench ROPE_VARIANTS name: profile that pre-RoPE variant")
    a = ap.parse_args()
    args = decode_inputs(a.bits, a.batch, a.ctx, torch.float16, seed=4)
    if a.rope:
        plan, splits = _rope_fn(rope_inputs(args, seed=4), a.rope)
        for _ in range(a.launches):
            plan()
        torch.cuda.synchronize()
        print("rope variant", a.rope, "splits", splits)
        return
    opts = {}
    if a.select:
        from antkv_compile.kernels.value_copies import selection_words

        opts["value_sel"] = selection_words(args[2])
    plan = DA.DecodePlan(*args, coded=a.coded, **opts)
    for _ in range(a.launches):
        plan()
    torch.cuda.synchronize()
    print("splits", plan.splits, "cuda kernel", plan.cuda_coded is not None)


if __name__ == "__main__":
    main()
