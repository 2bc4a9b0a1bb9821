"""Shared by the kernel test files: run Triton kernels under the interpreter when there is no CUDA.

Importing this module sets TRITON_INTERPRET=1 (no CUDA) before triton is imported, which the @triton.jit
decorator reads at import time; import it before any antkv_compile.kernels module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from antkv_compile.kernels import _common  # noqa: E402

needs_triton = pytest.mark.skipif(not _common.HAS_TRITON, reason=f"triton not importable: {_common.TRITON_IMPORT_ERROR}")
if _common.HAS_TRITON and not torch.cuda.is_available() and not _common.interpreting():
    needs_triton = pytest.mark.skip(reason="no CUDA and triton was imported before TRITON_INTERPRET=1 could be set")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
