"""Shared helpers of the Triton kernels: the optional triton import, dtype mapping, device facts.

Triton is optional: without it ``HAS_TRITON`` is False, the kernel modules still import (their
``@triton.jit`` functions are not defined) and the custom ops run their PyTorch references. On a
machine without a GPU, set ``TRITON_INTERPRET=1`` *before* the first import of a kernel module to
run the Triton kernels on the CPU (the interpreter; the ``@triton.jit`` decorator reads the
variable when the module is imported).
"""
from __future__ import annotations

import functools
import math
import os

import torch

try:  # pragma: no cover - exercised by the import itself
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure means "no triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_launch(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``'s device here (CUDA, or any device when interpreting)."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"triton is not importable ({TRITON_IMPORT_ERROR}); install antkv-compile[triton]")


def dot_dtype(dtype: torch.dtype):
    """Operand type of the tensor-core products for a storage dtype (fp32 stays fp32, exact)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 storage: exact fp32 products ("ieee"); half storage: products in half anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Multiprocessors of ``t``'s GPU (a nominal 8 when interpreting on the CPU)."""
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
