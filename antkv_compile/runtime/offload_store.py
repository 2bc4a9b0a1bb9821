"""The kernel store with retrieval (``offload="host"`` on the kernels path): :class:`OffloadKernelStore`.

Same buffers as :class:`~antkv_compile.runtime.kernel_store.KernelLayerStore` on the device, plus a fixed *exact
budget* for the retrieved tokens: each step (per layer), the coded tokens are scored on their codes
(``RetrievalMixin.coded_scores``: the GQA group's queries summed), the top ``k`` non-anchors are gathered from
the host copy (``runtime/host_kv.py``) into the slots after the anchors of an extended anchor set, and their
positions are set in an extended anchor bitmask. The unchanged decode kernels then attend exactly over anchors +
retrieved tokens + window and on the codes over every other coded token (the bitmask hides the retrieved ones
from the coded pass), merged inside the kernel: each token counted once, as ``numerics/retrieval.py`` computes.

The extended buffers have a fixed size (anchor capacity + ``k`` at the store's capacity), so their addresses do
not change and the decode's CUDA graph is replayed as usual; slots past this step's ``k`` hold position -1.
A step of several tokens over a coded prefix (chunked prefill, multi-token decode) retrieves per query token, as
token-by-token decoding would: the reference partial (``RetrievalMixin.retrieval_partials``, query tokens in blocks)
merged with the window (flash) and the chunk itself (``antkv::prefill_attention``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.attention import merge_partials
from ..numerics.retrieval import RetrievalMixin, retrieve_count
from .kernel_store import KernelLayerStore, _flash_with_lse, _ops

__all__ = ["OffloadKernelStore"]

_SCORE_BYTES = 1 << 28  # transient float32 bytes of one scoring chunk on a GPU (decoded keys)


class OffloadKernelStore(RetrievalMixin, KernelLayerStore):
    def __init__(self, *args, host, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.host = host
        g, c = self.geom, self.config
        self.retrieve_capacity = retrieve_count(g.capacity, g.capacity, c.retrieve_fraction, c.retrieve_min)
        a, r = self.anchor_capacity, self.retrieve_capacity
        kw = dict(device=g.device)
        self.ext_k = torch.zeros(g.batch, g.num_kv_heads, a + r, g.head_dim, dtype=g.dtype, **kw)
        self.ext_v = torch.zeros_like(self.ext_k)
        self.ext_pos = torch.full((g.batch, g.num_kv_heads, a + r), -1, dtype=torch.int32, **kw)
        self.ext_bits = torch.zeros_like(self.anchor_bits)
        self._anchors_copied = False

    def _score_chunk(self) -> int:
        g = self.geom
        if g.device.type != "cuda":
            return super()._score_chunk()
        return max(8192, _SCORE_BYTES // (4 * g.batch * g.num_kv_heads * g.head_dim))

    def _flush(self, n: int) -> None:
        super()._flush(n)
        self._anchors_copied = False  # the anchors changed: copied into the extended set at the next step

    def _stage(self, q: Tensor) -> None:
        """Fill the extended anchor set for this step: anchors, then the retrieved tokens."""
        a = self.anchor_capacity
        if not self._anchors_copied and a:
            self.ext_k[:, :, :a].copy_(self.anchor_k)
            self.ext_v[:, :, :a].copy_(self.anchor_v)
            self.ext_pos[:, :, :a].copy_(self.anchor_pos)
        self._anchors_copied = True
        idx = self.retrieve(q)
        k = 0 if idx is None else idx.shape[2]
        if k:
            k_r, v_r = self.host.gather(idx, self.geom.device)
            self.ext_k[:, :, a:a + k].copy_(k_r)
            self.ext_v[:, :, a:a + k].copy_(v_r)
            self.ext_pos[:, :, a:a + k].copy_(idx)
        self.ext_pos[:, :, a + k:].fill_(-1)
        from ..kernels.decode_attention import bits_from_positions

        self.ext_bits.copy_(bits_from_positions(self.ext_pos, self.geom.capacity))

    def _decode(self, q: Tensor, k: Tensor, v: Tensor):
        if self.n_coded:
            self._stage(q)
        self._staged = bool(self.n_coded)
        return super()._decode(q, k, v)

    def _decode_buffers(self, keys: Tensor, values: Tensor) -> tuple[Tensor, ...]:
        buf = super()._decode_buffers(keys, values)
        if not getattr(self, "_staged", False):
            return buf
        # (codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, ...): the extended set instead
        return (buf[0], buf[1], self.ext_bits, buf[3], self.ext_k, self.ext_v, self.ext_pos, *buf[7:])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, check_finite: bool = True) -> Tensor:
        if k.shape[2] > 1 and self.n_coded and self.retrieve_k():  # each query token retrieves its own top-k
            self._validate(q, k, v, check_finite)
            out, lse = self._chunk(q, k, v, coded=True)
            self._append(q, k, v, out, lse)
            return out.to(q.dtype)
        return super().attend(q, k, v, check_finite=check_finite)

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, coded: bool):
        if not (coded and self.n_coded and self.retrieve_k()):
            return super()._chunk(q, k, v, coded)
        scale = float(self.geom.scale)
        out, lse = _ops().prefill_attention(q, k, v, scale)
        parts = [*self.retrieval_partials(q), (out.float(), lse)]
        if self.n_window:  # the window precedes the chunk: unmasked
            parts.append(_flash_with_lse(q, self.win_k, self.win_v, scale))
        return merge_partials(parts)
