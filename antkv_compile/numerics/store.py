"""The quantized KV store of one attention layer (reference implementation, plain PyTorch).

Layout per (sequence, KV head), capacity N tokens:

    codes      [N, C]   VQ codes of every flushed token (anchors too: anchoring overrides a code)
    anchors    [A, D]   full-precision keys and values of the best-scoring tokens, + positions
    window     [<=W, D] the most recent tokens in full precision, with the queries that read them

Attention for new queries = merge by log-sum-exp of three partials: the coded tokens that are not
anchors (on the codes, through lookup tables), the anchors (exact), and window + new tokens
(exact, causal). New tokens enter the window; when it holds ``window`` tokens, all but the newest
``window - flush`` are flushed: they are scored over the queries seen since they arrived (the
window's own queries), the store's anchor set is updated to the top ``ceil(anchor_ratio * tokens)``
scores of old anchors and newcomers, and the newcomers' codes are written. Keeping the newest
tokens (flush < window) means no query ever sees its immediate past quantized. A chunk longer
than the window (prefill) is attended exactly and flushed the same way.

:class:`ScalarLayerStore` has the same interface with KIVI-style scalar quantization instead of VQ,
so every method of the evaluation harness runs through one protocol.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import AnTKVConfig
from .anchor_score import anchor_scores
from .attention import causal_mask, exact_attention, lut_attention, merge_partials
from .rope import RopeTable, rotate, unrotate
from .scalar_quant import ScalarQuantizer
from .vq import Codebook


# Coded tokens decoded at a time by the dequantized read path (bounds its transient buffers at
# 2 * B * H * _DECODE_CHUNK * D floats; the store itself keeps only codes, anchors and the window).
_DECODE_CHUNK = 8192

# Full-precision entries (anchors, window) are counted at 16 bits, the cache dtype of deployment
# (fp16/bf16), also when a CPU harness computes in float32.
FULL_PRECISION_BITS = 16


class CacheOverflowError(RuntimeError):
    """More tokens than the store was allocated for."""


class CacheInputError(ValueError):
    """Keys, values or queries that the store cannot take (shape, dtype, device, NaN/Inf)."""


@dataclasses.dataclass
class StoreGeometry:
    batch: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype
    device: torch.device
    scale: float


class _LayerStoreBase:
    """Window handling, validation and the attend/flush protocol shared by every store."""

    def __init__(self, geometry: StoreGeometry, window: int, flush: int | None = None) -> None:
        self.geom = geometry
        self.window = window
        self.flush = window if flush is None else flush
        if not 1 <= self.flush <= window:
            raise ValueError(f"flush must be in [1, window={window}], got {self.flush}")
        b, h, d = geometry.batch, geometry.num_kv_heads, geometry.head_dim
        kw = dict(dtype=geometry.dtype, device=geometry.device)
        self.n_coded = 0
        self.win_k = torch.empty(b, h, 0, d, **kw)
        self.win_v = torch.empty(b, h, 0, d, **kw)
        self.win_q: Tensor | None = None  # [B, Hq, n, D]
        self.win_out: Tensor | None = None  # [B, Hq, n, D] float32
        self.win_lse: Tensor | None = None  # [B, Hq, n] float32

    # ------------------------------------------------------------------ bookkeeping
    @property
    def n_window(self) -> int:
        return self.win_k.shape[2]

    def __len__(self) -> int:
        return self.n_coded + self.n_window

    def _check(self, name: str, t: Tensor, heads: int | None) -> None:
        g = self.geom
        if t.dim() != 4 or t.shape[0] != g.batch or t.shape[-1] != g.head_dim or (heads and t.shape[1] != heads):
            raise CacheInputError(
                f"{name} has shape {tuple(t.shape)}; this layer's store expects "
                f"[batch={g.batch}, heads={heads or 'any'}, tokens, head_dim={g.head_dim}]"
            )
        if t.dtype != g.dtype:
            raise CacheInputError(
                f"{name} is {t.dtype} but the store was built for {g.dtype}; build the store (or "
                f"compile the model) with the dtype the model runs in"
            )
        if t.device != g.device:
            raise CacheInputError(
                f"{name} is on {t.device} but the store lives on {g.device}; move the model and the "
                f"store to one device"
            )

    def _validate(self, q: Tensor, k: Tensor, v: Tensor, check_finite: bool) -> None:
        self._check("query", q, None)
        self._check("key", k, self.geom.num_kv_heads)
        self._check("value", v, self.geom.num_kv_heads)
        if q.shape[1] % self.geom.num_kv_heads:
            raise CacheInputError(f"{q.shape[1]} query heads do not group over {self.geom.num_kv_heads} KV heads")
        if k.shape[2] != v.shape[2] or k.shape[2] != q.shape[2]:
            raise CacheInputError("query, key and value must carry the same number of new tokens")
        if len(self) + k.shape[2] > self.geom.capacity:
            raise CacheOverflowError(
                f"the KV store holds {len(self)} of {self.geom.capacity} tokens and cannot take "
                f"{k.shape[2]} more; allocate a larger cache (max_cache_len / capacity) or shorten the input"
            )
        if check_finite and not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise CacheInputError(
                "keys or values contain NaN or Inf; the model's activations overflowed before reaching "
                "the cache (try float32 or bfloat16 instead of float16)"
            )

    # ------------------------------------------------------------------ protocol
    def _coded_partials(self, q: Tensor) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _flush(self, n: int) -> None:
        """Move the oldest ``n`` window tokens into the coded part."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, check_finite: bool = True) -> Tensor:
        """Attend new queries over the store plus the new tokens, then append the new tokens.

        q [B, Hq, T, D]; k, v [B, Hkv, T, D]: the T newest tokens, at positions len(self) + t.
        Returns the attention output [B, Hq, T, D] in q's dtype.
        """
        self._validate(q, k, v, check_finite)
        t = k.shape[2]
        parts = self._coded_partials(q) if self.n_coded else []
        keys = torch.cat([self.win_k, k], dim=2)
        values = torch.cat([self.win_v, v], dim=2)
        dev = q.device
        q_pos = torch.arange(len(self), len(self) + t, device=dev)
        k_pos = torch.arange(self.n_coded, len(self) + t, device=dev)
        parts.append(exact_attention(q, keys, values, self.geom.scale, causal_mask(q_pos, k_pos)))
        out, lse = merge_partials(parts)
        self.win_k, self.win_v = keys, values
        self.win_q = q if self.win_q is None else torch.cat([self.win_q, q], dim=2)
        self.win_out = out if self.win_out is None else torch.cat([self.win_out, out], dim=2)
        self.win_lse = lse if self.win_lse is None else torch.cat([self.win_lse, lse], dim=2)
        if self.n_window >= self.window:
            n = self.n_window - (self.window - self.flush)
            self._flush(n)
            # the flushed tokens' own queries can only read flushed tokens: drop them too
            self.win_k, self.win_v = self.win_k[:, :, n:], self.win_v[:, :, n:]
            self.win_q, self.win_out, self.win_lse = self.win_q[:, :, n:], self.win_out[:, :, n:], self.win_lse[:, :, n:]
        return out.to(q.dtype)

    def window_mask(self, n: int) -> Tensor:
        """Causal visibility of the oldest ``n`` window tokens to every window query [n_window, n]."""
        pos = torch.arange(self.n_window, device=self.geom.device)
        return causal_mask(pos, pos[:n])

    # ------------------------------------------------------------------ accounting
    def memory_bits(self) -> dict[str, int]:
        """Bits held per component (window counted as its keys and values)."""
        raise NotImplementedError

    def _window_bits(self) -> int:
        return 2 * self.win_k.numel() * FULL_PRECISION_BITS


class AnTKVLayerStore(_LayerStoreBase):
    """VQ codes + full-precision anchors chosen by Anchor Score + full-precision window."""

    def __init__(self, geometry: StoreGeometry, codebook_k: Codebook, codebook_v: Codebook, config: AnTKVConfig,
                 layer_index: int = 0, rope: RopeTable | None = None) -> None:
        super().__init__(geometry, config.window, config.flush_size)
        if config.key_space == "pre_rope" and rope is None:
            raise ValueError("key_space='pre_rope' needs the model's RoPE table (rope=RopeTable.from_model(model))")
        self.rope = rope
        g = geometry
        for name, cb in (("key", codebook_k), ("value", codebook_v)):
            if cb.head_dim != g.head_dim or cb.num_heads not in (1, g.num_kv_heads):
                raise CacheInputError(
                    f"the {name} codebook is for {cb.num_heads} head(s) of dim {cb.head_dim}, but this layer "
                    f"has {g.num_kv_heads} KV heads of dim {g.head_dim}: use an artifact calibrated for this model"
                )
        self.cb_k = codebook_k.to(g.device)
        self.cb_v = codebook_v.to(g.device)
        self.config = config
        b, h, n, d = g.batch, g.num_kv_heads, g.capacity, g.head_dim
        self.codes_k = torch.zeros(b, h, n, codebook_k.codes_per_vector, dtype=codebook_k.code_dtype, device=g.device)
        self.codes_v = torch.zeros(b, h, n, codebook_v.codes_per_vector, dtype=codebook_v.code_dtype, device=g.device)
        self.anchor_capacity = config.anchors_for(n) if config.score != "none" else 0
        a = self.anchor_capacity
        self.anchor_pos = torch.full((b, h, a), -1, dtype=torch.int32, device=g.device)
        self.anchor_score = torch.full((b, h, a), float("-inf"), dtype=torch.float32, device=g.device)
        self.anchor_k = torch.zeros(b, h, a, d, dtype=g.dtype, device=g.device)
        self.anchor_v = torch.zeros(b, h, a, d, dtype=g.dtype, device=g.device)
        self._gen = torch.Generator().manual_seed(config.seed * 1000 + layer_index)

    @property
    def num_anchors(self) -> int:
        return int((self.anchor_pos[0, 0] >= 0).sum()) if self.anchor_capacity else 0

    def _coded_partials(self, q: Tensor) -> list[tuple[Tensor, Tensor]]:
        g, n = self.geom, self.n_coded
        # coded tokens that are anchors are read from the anchors, never from their codes
        visible = torch.ones(g.batch, g.num_kv_heads, n + 1, dtype=torch.bool, device=g.device)
        parts = []
        if self.anchor_capacity:
            valid = self.anchor_pos >= 0
            visible.scatter_(2, torch.where(valid, self.anchor_pos, n).long(), False)
            parts.append(exact_attention(q, self.anchor_k, self.anchor_v, g.scale, valid[:, :, None, :]))
        if self.config.coded_path == "dequantized":  # decode chunk by chunk, dense attention, merge
            chunks = []
            for lo in range(0, n, _DECODE_CHUNK):
                hi = min(n, lo + _DECODE_CHUNK)
                k_hat, v_hat = self.decode_coded(lo, hi)
                chunks.append(exact_attention(q, k_hat, v_hat, g.scale, visible[:, :, None, lo:hi]))
            coded = chunks[0] if len(chunks) == 1 else merge_partials(chunks)
        else:
            coded = lut_attention(
                q, self.codes_k[:, :, :n], self.codes_v[:, :, :n], self.cb_k, self.cb_v, g.scale,
                visible[:, :, None, :n], self.config.value_mode,
            )
        return [coded, *parts]

    def decode_coded(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, hi - lo, D] (float32) decoded from the codes of positions lo .. hi - 1, keys
        post-RoPE (pre-RoPE codes are rotated by their positions, as the kernels do in registers)."""
        k_hat = self.cb_k.decode(self.codes_k[:, :, lo:hi])
        if self.config.key_space == "pre_rope":
            k_hat = rotate(k_hat, *self.rope(torch.arange(lo, hi, device=k_hat.device)))
        return k_hat, self.cb_v.decode(self.codes_v[:, :, lo:hi])

    def _flush(self, n: int) -> None:
        k, v, n0 = self.win_k[:, :, :n], self.win_v[:, :, :n], self.n_coded
        if self.config.key_space == "pre_rope":
            cos, sin = self.rope(torch.arange(n0, n0 + n, device=k.device))
            codes_k, k_pre = self.cb_k.quantize(unrotate(k.float(), cos, sin))
            k_hat = rotate(k_pre.float(), cos, sin).to(k.dtype)
        else:
            codes_k, k_hat = self.cb_k.quantize(k)
        codes_v, v_hat = self.cb_v.quantize(v)
        self.codes_k[:, :, n0:n0 + n] = codes_k
        self.codes_v[:, :, n0:n0 + n] = codes_v
        self.n_coded = n0 + n
        keep = self.config.anchors_for(self.n_coded)
        if not self.anchor_capacity or keep == 0:
            return
        scores = anchor_scores(
            self.win_q, k, v, self.win_out, self.win_lse, self.geom.scale, kind=self.config.score,
            k_hat=k_hat, v_hat=v_hat, mask=self.window_mask(n), generator=self._gen,
            row_stride=self.config.row_stride_for(self.win_q.shape[1] // k.shape[1]), band=self.config.score_band,
        )
        g = self.geom
        pos = torch.arange(n0, n0 + n, dtype=torch.int32, device=g.device).expand(g.batch, g.num_kv_heads, n)
        cand_score = torch.cat([self.anchor_score, scores], dim=2)
        cand_pos = torch.cat([self.anchor_pos, pos], dim=2)
        cand_k = torch.cat([self.anchor_k, k], dim=2)
        cand_v = torch.cat([self.anchor_v, v], dim=2)
        best = cand_score.topk(keep, dim=2).indices  # [B, H, keep]
        a = self.anchor_capacity
        self.anchor_score[:, :, :keep] = cand_score.gather(2, best)
        self.anchor_pos[:, :, :keep] = cand_pos.gather(2, best)
        idx = best[..., None].expand(-1, -1, -1, g.head_dim)
        self.anchor_k[:, :, :keep] = cand_k.gather(2, idx)
        self.anchor_v[:, :, :keep] = cand_v.gather(2, idx)
        if keep < a:
            self.anchor_score[:, :, keep:] = float("-inf")
            self.anchor_pos[:, :, keep:] = -1

    def memory_bits(self) -> dict[str, int]:
        g = self.geom
        code_bits_k = self.cb_k.codes_per_vector * (self.cb_k.num_centroids.bit_length() - 1)
        code_bits_v = self.cb_v.codes_per_vector * (self.cb_v.num_centroids.bit_length() - 1)
        tokens = g.batch * g.num_kv_heads
        n_anchor = int((self.anchor_pos >= 0).sum())
        return {
            "codes": tokens * self.n_coded * (code_bits_k + code_bits_v),
            "anchors": n_anchor * (2 * g.head_dim * FULL_PRECISION_BITS + 32),
            "window": self._window_bits(),
        }


class ExactLayerStore(_LayerStoreBase):
    """Full precision: every token stays in the (unbounded) window. The baseline of the harness."""

    def __init__(self, geometry: StoreGeometry) -> None:
        super().__init__(geometry, window=geometry.capacity + 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, check_finite: bool = False) -> Tensor:
        self._validate(q, k, v, check_finite)
        t, n = k.shape[2], self.n_window
        keys = torch.cat([self.win_k, k], dim=2)
        values = torch.cat([self.win_v, v], dim=2)
        q_pos = torch.arange(n, n + t, device=q.device)
        out, _ = exact_attention(q, keys, values, self.geom.scale, causal_mask(q_pos, torch.arange(n + t, device=q.device)))
        self.win_k, self.win_v = keys, values
        return out.to(q.dtype)

    def memory_bits(self) -> dict[str, int]:
        return {"codes": 0, "anchors": 0, "window": self._window_bits()}


class ScalarLayerStore(_LayerStoreBase):
    """KIVI-style store: keys per channel, values per token, grouped asymmetric scalar codes."""

    def __init__(self, geometry: StoreGeometry, quantizer: ScalarQuantizer, window: int, flush: int | None = None) -> None:
        super().__init__(geometry, window, flush)
        self.quant = quantizer
        self.k_hat: list[Tensor] = []
        self.v_hat: list[Tensor] = []
        self._bits = 0

    def _coded_partials(self, q: Tensor) -> list[tuple[Tensor, Tensor]]:
        k = torch.cat(self.k_hat, dim=2)
        v = torch.cat(self.v_hat, dim=2)
        return [exact_attention(q, k, v, self.geom.scale)]

    def _flush(self, n: int) -> None:
        k_hat, bits_k = self.quant.quantize_keys(self.win_k[:, :, :n])
        v_hat, bits_v = self.quant.quantize_values(self.win_v[:, :, :n])
        self.k_hat.append(k_hat)
        self.v_hat.append(v_hat)
        self._bits += bits_k + bits_v
        self.n_coded += n

    def memory_bits(self) -> dict[str, int]:
        return {"codes": self._bits, "anchors": 0, "window": self._window_bits()}

