"""Host (CPU) time of one decode-attention call, the part that CUDA graphs would hide: the custom op as the
compiled model calls it (``torch.ops.antkv.decode_attention``), at the end-to-end benchmark's shape (Llama-3-8B
attention, batch 128; the host time does not depend on the context, so the store is short), then a cProfile
of the same calls by function. Run on the GPU machine:

    python benchmarks/host_overhead.py --bits 1 --batch 128 --calls 300
    python benchmarks/host_overhead.py --store --bits 1 --batch 160 --calls 320   # a kernel store's decode step
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


def store_step(bits: str, batch: int, ctx: int):
    """One layer's decode step as the compiled model runs it inside ``antkv_rt::cache_attend``: a
    KernelLayerStore (Llama-3-8B attention shape) filled to ``ctx`` tokens, then ``attend`` of one new token
    (the window write, the decode kernels, the window append and every 32nd call a flush)."""
    from antkv_compile.config import AnTKVConfig
    from antkv_compile.numerics.store import StoreGeometry
    from antkv_compile.numerics.vq import random_codebook
    from antkv_compile.runtime.kernel_store import KernelLayerStore

    hkv, g, d, dev, dt = 8, 4, 128, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    cfg = AnTKVConfig(bits=bits, anchor_ratio=0.01, window=64)
    gen = torch.Generator().manual_seed(0)
    cbk, cbv = (random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5) for _ in range(2))
    store = KernelLayerStore(StoreGeometry(batch, hkv, d, ctx + 4096, dt, dev, scale=d ** -0.5), cbk, cbv, cfg)
    for lo in range(0, ctx, 1024):
        n = min(1024, ctx - lo)
        store.fill(*(torch.randn(batch, h, n, d, device=dev, dtype=dt) for h in (hkv * g, hkv, hkv)))
    q, k, v = (torch.randn(batch, h, 1, d, device=dev, dtype=dt) for h in (hkv * g, hkv, hkv))
    return lambda: store.attend(q, k, v, check_finite=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--store", action="store_true", help="a kernel store's decode step (attend) instead of the op")
    a = ap.parse_args()
    if a.store:
        step = store_step(a.bits, a.batch, a.ctx)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  bits {a.bits}  batch {a.batch}")
        print(f"KernelLayerStore.attend (1 token): {host_us_per_call(step, a.calls):.1f} us host per call")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            step()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        print(s.getvalue())
        return
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
