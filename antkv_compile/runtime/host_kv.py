"""The host tier of the retrieval mode (``offload="host"``): full-precision K/V of every coded token in host memory.

:class:`PinnedHostKV` has the interface of :class:`antkv_compile.numerics.retrieval.HostCopy` (same token-major
layout) and moves the data the way a GPU wants it moved:

* **writes** (a flush, a prefill chunk's coded tokens): the tokens are copied once on the device (the window's
  buffers are reused right after the flush), then a side stream, ordered after that copy, copies them into the
  pinned buffer with ``non_blocking`` copies. The decode step's stream never waits for them; the next read does
  (an event), on the device.
* **reads** (a step's retrieved tokens): ``gather="uva"`` (default on CUDA) gathers the rows by a zero-copy kernel
  reading the pinned buffer through its device mapping (``kernels/host_gather.py``), the row numbers staying on the
  device; ``gather="staged"`` copies the row numbers to the host, ``index_select`` s into a pinned staging buffer and
  copies that to the device (one host synchronisation per call: the simplest correct path, and the fallback when
  the buffer is not mapped).

On a CPU (and without CUDA) it is the plain :class:`HostCopy`.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..numerics.retrieval import HostCopy
from ..numerics.store import StoreGeometry

log = logging.getLogger(__name__)

__all__ = ["PinnedHostKV", "GATHER"]

GATHER = "uva"  # how a CUDA store reads the retrieved rows: "uva" (zero-copy kernel) or "staged"


class PinnedHostKV(HostCopy):
    def __init__(self, geometry: StoreGeometry, gather: str | None = None) -> None:
        self.device = geometry.device
        self.cuda = geometry.device.type == "cuda"
        super().__init__(geometry, "cpu", pin_memory=self.cuda)
        self.gather_mode = gather or GATHER
        if self.gather_mode not in ("uva", "staged"):
            raise ValueError(f"gather must be 'uva' or 'staged', got {self.gather_mode!r}")
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._written: torch.cuda.Event | None = None  # the last write's completion on the side stream
        self.bytes_written = 0
        self.bytes_read = 0

    def write(self, k: Tensor, v: Tensor, lo: int) -> None:
        n = k.shape[2]
        self.bytes_written += 2 * k.numel() * k.element_size()
        if not self.cuda:
            return super().write(k, v, lo)
        main = torch.cuda.current_stream(self.device)
        src = [x.permute(2, 0, 1, 3).contiguous() for x in (k, v)]  # on the main stream: the window moves next
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            self.k[lo:lo + n].copy_(src[0], non_blocking=True)
            self.v[lo:lo + n].copy_(src[1], non_blocking=True)
        for x in src:
            x.record_stream(self._stream)  # kept alive until the side stream has read it
        ev = torch.cuda.Event()
        ev.record(self._stream)
        self._written = ev

    def gather(self, idx: Tensor, to: torch.device) -> tuple[Tensor, Tensor]:
        d = self.k.shape[-1]
        self.bytes_read += 2 * idx.numel() * d * self.k.element_size()
        if not self.cuda:
            return super().gather(idx, to)
        rows = self.rows(idx).reshape(-1)
        hk, hv = self.k.view(-1, d), self.v.view(-1, d)
        if self.gather_mode == "uva":
            if self._written is not None:
                torch.cuda.current_stream(self.device).wait_event(self._written)  # on the device, no host wait
            out_k = torch.empty(rows.numel(), d, dtype=self.k.dtype, device=self.device)
            out_v = torch.empty_like(out_k)
            try:
                from ..kernels.host_gather import gather_rows_uva

                gather_rows_uva(hk, hv, rows, out_k, out_v)
            except Exception as exc:  # noqa: BLE001 - not mapped / no NVRTC: the staged path is always correct
                log.warning("antkv: zero-copy host gather unavailable (%s); using the staged gather", exc)
                self.gather_mode = "staged"
                self.bytes_read -= 2 * idx.numel() * d * self.k.element_size()
                return self.gather(idx, to)
        else:
            from ..kernels.host_gather import gather_rows_staged

            if self._written is not None:
                self._written.synchronize()  # index_select reads the host buffer on the host
            out_k, out_v = gather_rows_staged(hk, hv, rows)
        return out_k.view(*idx.shape, d), out_v.view(*idx.shape, d)
