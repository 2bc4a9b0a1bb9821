"""End-to-end benchmark of the compiled model: decode throughput, capacity, chunked prefill, memory accounting.

    python benchmarks/e2e_bench.py                                   # everything, Llama-3-8B shape, on the GPU
    python benchmarks/e2e_bench.py --runs throughput --configs inductor,dense_decode
    python benchmarks/e2e_bench.py --runs capacity,prefill128k --out $OUT
    python benchmarks/e2e_bench.py --plan-only --budget 79GiB         # what the planner schedules, no device
    python benchmarks/e2e_bench.py --shape tiny --device cpu ...      # CPU smoke run (see tests/test_e2e_bench.py)

The same as ``antkv-compile bench``; every option and the method are described in ``antkv_compile/bench.py``.
The model has random bf16 weights: speed and memory do not depend on the weight values.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from antkv_compile.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
