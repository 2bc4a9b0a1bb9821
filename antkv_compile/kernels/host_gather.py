"""Zero-copy gather of retrieved tokens' K/V from pinned host memory (the tiered retrieval mode, issue 19).

The full-precision copy is token-major, [capacity, B, Hkv, D] viewed as rows of D elements
(``numerics.retrieval.HostCopy``); a step's retrieved tokens are rows ``rows[b, h, j] = idx[b, h, j] * B * Hkv +
b * Hkv + h``. :func:`gather_rows_uva` reads those rows straight from the pinned buffer through its device mapping
(UVA), one warp per row in 16-byte words, with the row numbers in device memory: no host synchronisation and no
staging copy, ordered on PyTorch's current stream. :func:`gather_rows_staged` is the simplest correct alternative
(row numbers copied to the host, ``index_select`` into a pinned staging buffer, one asynchronous host-to-device
copy); it synchronises the host once per call. Both return [n_rows, D] on the device; tests/test_cuda.py checks
them against ``index_select`` on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

_SOURCE = r"""
#if VEC == 16
typedef uint4 word_t;
#else
typedef unsigned int word_t;
#endif
extern "C" __global__ void antkv_host_gather(const word_t* __restrict__ host_k, const word_t* __restrict__ host_v,
                                             const long long* __restrict__ rows, word_t* __restrict__ out_k,
                                             word_t* __restrict__ out_v, int n_rows, int words) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= n_rows) return;
    long long src = rows[r] * (long long)words;
    long long dst = (long long)r * words;
    for (int w = threadIdx.x % 32; w < words; w += 32) {
        out_k[dst + w] = host_k[src + w];
        out_v[dst + w] = host_v[src + w];
    }
}
"""

_ROWS_PER_BLOCK = 8


def gather_rows_uva(host_k: Tensor, host_v: Tensor, rows: Tensor, out_k: Tensor, out_v: Tensor) -> None:
    """out_k[i], out_v[i] = host_k[rows[i]], host_v[rows[i]] for pinned host [R, D] tensors and rows [n] (int64, on
    the device); out_* [n, D] contiguous on the device. Zero-copy: the kernel reads host memory over the bus."""
    from .cuda_rtc import load_kernel

    dev = out_k.device
    row_bytes = host_k.shape[1] * host_k.element_size()
    vec = 16 if row_bytes % 16 == 0 else 4
    if row_bytes % 4:
        raise ValueError(f"rows of {row_bytes} bytes: the gather copies 4-byte words")
    kern = load_kernel(_SOURCE, "antkv_host_gather", dev, {"VEC": vec})
    n = rows.numel()
    if n == 0:
        return
    with torch.cuda.device(dev):
        pk, pv = _pointers(host_k), _pointers(host_v)
    kern((-(-n // _ROWS_PER_BLOCK), 1, 1), 32 * _ROWS_PER_BLOCK, 0,
         [pk, pv, rows.contiguous(), out_k, out_v, n, row_bytes // vec])


_MAPPED: dict[tuple[int, int], int] = {}


def _pointers(t: Tensor):
    """The mapped device address of a pinned host tensor (looked up once per buffer and offset)."""
    from .cuda_rtc import mapped_pointer

    key = (t.data_ptr(), t.untyped_storage().nbytes())
    if key not in _MAPPED:
        _MAPPED[key] = mapped_pointer(t)
    return _MAPPED[key]


def gather_rows_staged(host_k: Tensor, host_v: Tensor, rows: Tensor, staging: tuple[Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor]:
    """The same gather through the host: row numbers to the host (one synchronisation), ``index_select`` into
    pinned staging buffers, asynchronous copies to ``rows``' device."""
    idx = rows.to("cpu")
    n, d = idx.numel(), host_k.shape[1]
    outs = []
    for i, src in enumerate((host_k, host_v)):
        buf = staging[i][:n] if staging is not None else torch.empty(n, d, dtype=src.dtype,
                                                                     pin_memory=rows.is_cuda)
        torch.index_select(src, 0, idx, out=buf)
        outs.append(buf.to(rows.device, non_blocking=True))
    return outs[0], outs[1]


__all__ = ["gather_rows_staged", "gather_rows_uva"]
