"""Target program for Nsight Compute: the coded-decode kernels at one benchmark shape, a few launches each. Run on the
GPU machine, e.g.

    ncu -k regex:antkv_rope_coded -c 1 --set full python benchmarks/ncu_coded_decode.py --bits 1 --ctx 131072 --batch 32

``--rope VARIANT`` (default ``rope``, the CUDA C++ kernel of the default recipe; a kernels_bench ROPE_VARIANTS name)
profiles the pre-RoPE pair-layout kernel; ``--post-rope`` the post-RoPE recipe's Triton loop
(``ncu -k regex:_decode_partials_kernel ...``) on the same codes (kernels/NOTES.md quotes what they reported).
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
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--rope", default="rope", help="a kernels_bench ROPE_VARIANTS name: profile that pre-RoPE variant")
    ap.add_argument("--post-rope", action="store_true", help="profile the post-RoPE Triton loop instead")
    a = ap.parse_args()
    args = decode_inputs(a.bits, a.batch, a.ctx, torch.float16, seed=4)
    if a.post_rope:
        plan, what = DA.DecodePlan(*args), "post-RoPE Triton loop"
    else:
        plan, _ = _rope_fn(rope_inputs(args, seed=4), a.rope)
        what = f"rope variant {a.rope}"
    for _ in range(a.launches):
        plan()
    torch.cuda.synchronize()
    print(what, "splits", plan.splits)


if __name__ == "__main__":
    main()
