"""Reference value read on codes: per-centroid probability mass ("histogram") vs gathering centroids.

    python benchmarks/value_mode_cpu.py

Times `numerics.attention.vq_values` (the plain-PyTorch reference) on the CPU at a decode-like shape
(1 query per head, GQA group 3, SmolLM2's head_dim 64) for growing contexts. The GPU kernel's choice is
measured separately in `antkv_compile/kernels/NOTES.md`.
"""
import json
import time

import torch

from antkv_compile.config import get_preset
from antkv_compile.numerics.attention import vq_values
from antkv_compile.numerics.vq import random_codebook
from antkv_compile.reporting import environment, write_json

rows = []
for bits in ("1", "0.375"):
    cb = random_codebook(get_preset(bits), 3, 64, generator=torch.Generator().manual_seed(0))
    for n in (1024, 4096, 16384):
        codes = torch.randint(0, cb.num_centroids, (1, 3, n, cb.codes_per_vector), dtype=torch.uint8)
        p = torch.softmax(torch.randn(1, 3, 3, 1, n), -1)
        row = {"bits": bits, "context": n}
        for mode in ("histogram", "gather"):
            vq_values(p, codes, cb, mode)
            t = time.perf_counter()
            for _ in range(20):
                vq_values(p, codes, cb, mode)
            row[f"{mode}_ms"] = (time.perf_counter() - t) / 20 * 1e3
        rows.append(row)
        print(json.dumps(row))
write_json("benchmarks/results/value_mode_cpu.json", {"environment": environment(), "results": rows})
