"""Host (CPU) time of one decode-attention call, the part that CUDA graphs would hide: the custom op as the
compiled model calls it (``torch.ops.antkv.decode_attention``), at the end-to-end benchmark's shape (Llama-3-8B
attention, batch 128; the host time does not depend on the context, so the store is short), then a cProfile
of the same calls by function. Run on the GPU machine:

    python benchmarks/host_overhead.py --bits 1 --batch 128 --calls 300
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_bench import decode_inputs  # noqa: E402

import antkv_compile.kernels.ops  # noqa: E402,F401  (registers torch.ops.antkv)


def host_us_per_call(fn, calls: int) -> float:
    """Mean host microseconds per call; the GPU is drained every 32 calls so the launch queue never fills
    (a full queue would make the launches wait for the GPU and count GPU time as host time)."""
    total = 0.0
    for i in range(0, calls, 32):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(min(32, calls - i)):
            fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    args = decode_inputs(a.bits, a.batch, a.ctx, torch.bfloat16, seed=0)
    op = torch.ops.antkv.decode_attention
    for _ in range(5):
        op(*args)
    torch.cuda.synchronize()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  bits {a.bits}  batch {a.batch}")
    print(f"torch.ops.antkv.decode_attention: {host_us_per_call(lambda: op(*args), a.calls):.1f} us host per call")
    empty = torch.empty(1, device="cuda")
    print(f"reference, torch.empty on the GPU: {host_us_per_call(lambda: torch.empty(1, device='cuda'), a.calls):.1f}"
          f" us; x.add_(1): {host_us_per_call(lambda: empty.add_(1), a.calls):.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        op(*args)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
    print(s.getvalue())


if __name__ == "__main__":
    main()
