"""Target program for Nsight Compute: the Anchor Score kernel (``_ans_scores_kernel``) at a benchmark shape
(Llama-3-8B heads, fp16, B = 1), a few launches. Run on the GPU machine, e.g.

    ncu -k regex:_ans_scores_kernel -c 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy python benchmarks/ncu_anchor_scores.py --t 8192 --row-stride 4

(kernels/NOTES.md "Anchor Scores" quotes what it reported). ``--sass`` prints the kernel's per-opcode instruction counts from
the cubin Triton built (no ncu needed).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from antkv_compile.kernels import prefill_attention as PA  # noqa: E402


def opcode_counts(compiled) -> collections.Counter:
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--row-stride", type=int, default=4)
    ap.add_argument("--band", type=int, default=256)
    ap.add_argument("--blocks", default="", help="BLOCK_M,BLOCK_N,warps,stages (default: the kernel's choice)")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--sass", action="store_true")
    a = ap.parse_args()
    hq, hkv, d, dev = 32, 8, 128, "cuda"
    torch.manual_seed(0)
    q = torch.randn(1, hq, a.t, d, device=dev, dtype=torch.float16)
    k, v = (torch.randn(1, hkv, a.t, d, device=dev, dtype=torch.float16) for _ in range(2))
    dk, dv = ((0.3 * torch.randn(1, hkv, a.t, d, device=dev)).half() for _ in range(2))
    out, lse = PA.prefill_attention_triton(q, k, v, d**-0.5)
    blocks = tuple(int(x) for x in a.blocks.split(",")) if a.blocks else None
    for _ in range(a.launches):
        PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, d**-0.5, row_stride=a.row_stride, band=a.band, blocks=blocks)
    torch.cuda.synchronize()
    if a.sass:
        for compiled in PA._ans_scores_kernel.device_caches[torch.cuda.current_device()][0].values():
            print(f"n_regs {compiled.n_regs} n_spills {compiled.n_spills} shared {compiled.metadata.shared}",
                  dict(opcode_counts(compiled).most_common(30)))


if __name__ == "__main__":
    main()
