"""Retrieval over the coded store: the reference numerics of the tiered ("offload") mode, issue 19.

The coded store is used as an *index* over a full-precision copy of every coded token kept elsewhere (host
memory). One step, per layer and KV head:

1. score every coded token on its codes with the queries of the KV head's GQA group (and of every new token)
   summed: ``score_i = sum_{g,t} q_{g,t} . k_hat_i * scale`` -- the sum of the logits the coded attention
   computes for that token, so the ranking is the coded attention's own;
2. choose the top ``k`` of the coded tokens that are not anchors (anchors and the window are exact already),
   ``k = min(candidates, max(retrieve_min, ceil(retrieve_fraction * n_coded)))``;
3. attend exactly over the retrieved tokens (full-precision K/V from the copy), exactly over the anchors and the
   window (as the plain store does), and on the codes over the coded tokens that are neither anchors nor
   retrieved; merge the partials by log-sum-exp. Every token is counted once.

At ``k`` = every candidate the step is exact attention over full precision; at ``k = 0`` it is the plain coded
store's step. :class:`HostCopy` is the plain-tensor full-precision copy (synchronous); the runtime's pinned,
stream-ordered copy (``runtime/host_kv.py``) has the same interface.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention import _softmax_partial, exact_attention, group_queries, key_lookup_tables, lut_attention
from .attention import lut_logits, merge_partials, ungroup
from .store import _DECODE_CHUNK, AnTKVLayerStore, StoreGeometry

__all__ = ["retrieve_count", "summed_queries", "scores_from_keys", "scores_from_codes", "select_retrieved",
           "HostCopy", "RetrievalMixin", "RetrievalLayerStore"]


def retrieve_count(n_coded: int, candidates: int, fraction: float, floor: int) -> int:
    """Tokens retrieved per (sequence, KV head): ``min(candidates, max(floor, ceil(fraction * n_coded)))``."""
    if candidates <= 0:
        return 0
    return min(candidates, max(int(floor), math.ceil(fraction * n_coded)))


def summed_queries(q: Tensor, num_kv_heads: int, per_token: bool = False) -> Tensor:
    """q [B, Hq, T, D] -> the GQA group's queries summed over its heads and the tokens [B, Hkv, D] (float32), or
    over its heads only [B, Hkv, T, D] (``per_token``)."""
    qg = group_queries(q, num_kv_heads).float()
    return qg.sum(dim=2) if per_token else qg.sum(dim=(2, 3))


def scores_from_keys(q_sum: Tensor, k_hat: Tensor, scale: float) -> Tensor:
    """Scores [B, Hkv, (T,) n] of (decoded, post-RoPE) keys k_hat [B, Hkv, n, D] for summed queries
    [B, Hkv, (T,) D]."""
    q4 = q_sum if q_sum.dim() == 4 else q_sum[:, :, None]
    out = torch.einsum("bhtd,bhnd->bhtn", q4, k_hat.float()) * scale
    return out if q_sum.dim() == 4 else out[:, :, 0]


def scores_from_codes(q_sum: Tensor, codes_k: Tensor, codebook_k, scale: float) -> Tensor:
    """The same scores through the key lookup tables of post-RoPE codes codes_k [B, Hkv, n, C]."""
    q4 = q_sum if q_sum.dim() == 4 else q_sum[:, :, None]
    lut, bias = key_lookup_tables(q4[:, :, None], codebook_k, scale)
    out = lut_logits(lut, bias, codes_k)[:, :, 0]
    return out if q_sum.dim() == 4 else out[:, :, 0]


def select_retrieved(scores: Tensor, excluded: Tensor, k: int) -> Tensor:
    """Positions [B, Hkv, (T,) k] (int64) of the ``k`` best-scoring tokens [B, Hkv, (T,) n] that are not
    ``excluded`` [B, Hkv, n].

    ``k`` must not exceed the number of candidates of any (sequence, head) (see :func:`retrieve_count`)."""
    if scores.dim() == 4:
        excluded = excluded[:, :, None]
    masked = scores.float().masked_fill(excluded, float("-inf"))
    return masked.topk(k, dim=-1).indices


def retrieved_attention(q: Tensor, k_r: Tensor, v_r: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Exact partial of q [B, Hq, T, D] over each query token's own retrieved tokens k_r, v_r [B, Hkv, T, k, D]."""
    qg = group_queries(q, k_r.shape[1]).float()
    logits = torch.einsum("bhgtd,bhtkd->bhgtk", qg, k_r.float()) * scale
    out, lse = _softmax_partial(logits, lambda p: torch.einsum("bhgtk,bhtkd->bhgtd", p, v_r.float()), None)
    return ungroup(out), ungroup(lse)


class HostCopy:
    """Full-precision K/V of every coded token in plain tensors on ``device`` (the reference: written and read
    synchronously), token-major [capacity, B, Hkv, D] so that the tokens of one flush are one contiguous block.
    ``write`` takes the tokens [B, Hkv, n, D] of slots lo .. lo + n - 1; ``gather`` returns the K/V [B, Hkv, k, D]
    of positions idx [B, Hkv, k] on ``to``."""

    def __init__(self, geometry: StoreGeometry, device: torch.device | str = "cpu", pin_memory: bool = False) -> None:
        g = geometry
        shape = (g.capacity, g.batch, g.num_kv_heads, g.head_dim)
        # not zeroed (tens of GB of pinned memory at long contexts): only written slots are ever read
        self.k = torch.empty(shape, dtype=g.dtype, device=device, pin_memory=pin_memory)
        self.v = torch.empty(shape, dtype=g.dtype, device=device, pin_memory=pin_memory)

    def write(self, k: Tensor, v: Tensor, lo: int) -> None:
        n = k.shape[2]
        self.k[lo:lo + n].copy_(k.permute(2, 0, 1, 3))
        self.v[lo:lo + n].copy_(v.permute(2, 0, 1, 3))

    def rows(self, idx: Tensor) -> Tensor:
        """Row numbers [B, Hkv, ...] (int64) of positions idx [B, Hkv, ...] in the [capacity * B * Hkv, D] view."""
        b, h = idx.shape[:2]
        bh = torch.arange(b * h, device=idx.device).view(b, h, *([1] * (idx.dim() - 2)))
        return idx.long() * (b * h) + bh

    def gather(self, idx: Tensor, to: torch.device) -> tuple[Tensor, Tensor]:
        d = self.k.shape[-1]
        rows = self.rows(idx).to(self.k.device).reshape(-1)
        out = [x.view(-1, d).index_select(0, rows).view(*idx.shape, d).to(to) for x in (self.k, self.v)]
        return out[0], out[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RetrievalMixin:
    """Retrieval over an AnTKV store's codes (see the module docstring); mixed into a layer store class that has
    the reference store's buffers. Needs ``self.host`` (a :class:`HostCopy`-like object)."""

    host: HostCopy
    last_retrieved: Tensor | None = None  # positions retrieved by the last step [B, Hkv, k] (inspection)

    def retrieve_k(self) -> int:
        n = self.n_coded
        anchors = self.config.anchors_for(n) if self.anchor_capacity else 0  # == num_anchors, without a device read
        return retrieve_count(n, n - anchors, self.config.retrieve_fraction, self.config.retrieve_min)

    def _flush(self, n: int) -> None:
        self.host.write(self.win_k[:, :, :n], self.win_v[:, :, :n], self.n_coded)
        super()._flush(n)

    def _anchor_mask(self) -> Tensor:
        """[B, Hkv, n_coded] True at the coded tokens that are anchors."""
        g, n = self.geom, self.n_coded
        mask = torch.zeros(g.batch, g.num_kv_heads, n + 1, dtype=torch.bool, device=g.device)
        if self.anchor_capacity:
            mask.scatter_(2, torch.where(self.anchor_pos >= 0, self.anchor_pos, n).long(), True)
        return mask[:, :, :n]

    def _score_chunk(self) -> int:
        return _DECODE_CHUNK

    def coded_scores(self, q: Tensor, per_token: bool = False) -> Tensor:
        """Scores [B, Hkv, n_coded] of every coded token for the queries q summed over the group and the tokens, or
        [B, Hkv, T, n_coded] summed over the group only (``per_token``)."""
        g, n = self.geom, self.n_coded
        q_sum = summed_queries(q, g.num_kv_heads, per_token)
        if self.config.key_space != "pre_rope" and self.config.coded_path == "lut":
            return scores_from_codes(q_sum, self.codes_k[:, :, :n], self.cb_k, g.scale)
        step = self._score_chunk()
        return torch.cat([scores_from_keys(q_sum, self._decoded_keys(lo, min(n, lo + step)), g.scale)
                          for lo in range(0, n, step)], dim=-1)

    def _decoded_keys(self, lo: int, hi: int) -> Tensor:
        """Post-RoPE keys [B, Hkv, hi - lo, D] (float32) decoded from the codes of slots lo .. hi - 1 (the keys of
        :meth:`decode_coded`, without decoding the values)."""
        from .rope import rotate

        k_hat = self.cb_k.decode(self.codes_k[:, :, lo:hi])
        if self.config.key_space == "pre_rope":
            k_hat = rotate(k_hat, *self.rope(torch.arange(lo, hi, device=k_hat.device)))
        return k_hat

    def retrieve(self, q: Tensor) -> Tensor | None:
        """Positions [B, Hkv, k] retrieved for all the queries q together (None when k = 0): what a decode kernel
        step reads (one extended anchor set for its T <= 64 / G tokens; T = 1 in decoding)."""
        k = self.retrieve_k()
        self.last_retrieved = None if k == 0 else select_retrieved(self.coded_scores(q), self._anchor_mask(), k)
        return self.last_retrieved

    def retrieval_partials(self, q: Tensor) -> list[tuple[Tensor, Tensor]] | None:
        """The partial over the coded part (retrieved tokens and anchors exact, the rest on the codes) with each
        query token's own top-k (what token-by-token decoding computes, also for a chunk of T tokens); None when
        k = 0. Query tokens are taken in blocks that bound the [T, n_coded] scores and masks."""
        k = self.retrieve_k()
        if k == 0:
            self.last_retrieved = None
            return None
        g, n = self.geom, self.n_coded
        anchors = self._anchor_mask()
        block = max(1, (1 << 26) // max(1, g.batch * g.num_kv_heads * n))
        outs, lses = [], []
        for t0 in range(0, q.shape[2], block):
            qb = q[:, :, t0:t0 + block]
            idx = select_retrieved(self.coded_scores(qb, per_token=True), anchors, k)  # [B, Hkv, t, k]
            k_r, v_r = self.host.gather(idx, g.device)
            parts = [retrieved_attention(qb, k_r, v_r, g.scale)]
            if self.anchor_capacity:
                parts.append(exact_attention(qb, self.anchor_k, self.anchor_v, g.scale,
                                             (self.anchor_pos >= 0)[:, :, None, :]))
            visible = ~anchors[:, :, None].expand(-1, -1, idx.shape[2], -1).scatter(3, idx, True)
            if bool(visible.any()):
                parts.append(self._coded_rest(qb, visible))
            out, lse = merge_partials(parts)
            outs.append(out)
            lses.append(lse)
        self.last_retrieved = idx[:, :, 0] if q.shape[2] == 1 else idx
        return [(torch.cat(outs, dim=2), torch.cat(lses, dim=2))]

    def _coded_rest(self, q: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        """Partial over the coded tokens of ``visible`` [B, Hkv, T, n_coded], on their codes."""
        g, n = self.geom, self.n_coded
        if self.config.key_space != "pre_rope" and self.config.coded_path == "lut":
            return lut_attention(q, self.codes_k[:, :, :n], self.codes_v[:, :, :n], self.cb_k, self.cb_v, g.scale,
                                 visible, self.config.value_mode)
        chunks = []
        step = self._score_chunk()
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            k_hat, v_hat = self.decode_coded(lo, hi)
            chunks.append(exact_attention(q, k_hat, v_hat, g.scale, visible[..., lo:hi]))
        return merge_partials(chunks)


class RetrievalLayerStore(RetrievalMixin, AnTKVLayerStore):
    """The reference store with retrieval: :class:`AnTKVLayerStore` (codes, anchors, window: what a kernel store
    keeps on the device) plus a full-precision copy of every coded token (``host``), written at each flush and
    read for the retrieved tokens only."""

    def __init__(self, *args, host=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.host = host if host is not None else HostCopy(self.geom)

    def _coded_partials(self, q: Tensor) -> list[tuple[Tensor, Tensor]]:
        parts = self.retrieval_partials(q)
        return super()._coded_partials(q) if parts is None else parts

    def host_bits(self) -> int:
        """Bits of the full-precision copy of the coded tokens (off the device), at 16 bits an element."""
        g = self.geom
        return 2 * g.batch * g.num_kv_heads * self.n_coded * g.head_dim * 16
