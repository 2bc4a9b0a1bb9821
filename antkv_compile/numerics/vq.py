"""Product (and residual) vector quantization of head vectors.

A :class:`Codebook` codes the keys *or* the values of one layer. Vectors are first moved into a
*coding space* by an affine map ``x' = (x - mean) @ transform`` (one per KV head, or one shared by
all heads). The transform carries the metric that matters: for keys, the query covariance (so
squared distance in coding space is the expected squared logit error); for values, the output
projection's Gram matrix. Identity with zero mean gives plain VQ. In coding space each vector is
cut into ``S = D / sub_dim`` sub-vectors and each is coded, stage by stage, by its nearest centroid.

Decode-time attention never needs ``decode``: queries are mapped into the coding space once
(:meth:`Codebook.query_to_coding_space`) and logits are sums of per-query lookup tables.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import VQPreset

_ENCODE_CHUNK = 4096  # tokens per distance computation, bounds memory at T * S * M floats


@dataclasses.dataclass
class Codebook:
    """Codebooks and coding-space map for the keys or the values of one layer.

    centroids: [stages, H_cb, S, M, sub_dim], float32
    transform: [H_cb, D, D]   (x - mean) @ transform = coding-space vector
    inverse:   [H_cb, D, D]   coding-space vector @ inverse + mean = x
    mean:      [H_cb, D]
    H_cb is the number of KV heads (per-head codebooks) or 1 (shared by all heads).
    """

    centroids: Tensor
    transform: Tensor
    inverse: Tensor
    mean: Tensor

    def __post_init__(self) -> None:
        if self.centroids.dim() != 5:
            raise ValueError(f"centroids must be [stages, heads, S, M, sub_dim], got {tuple(self.centroids.shape)}")
        h, d = self.mean.shape
        if self.transform.shape != (h, d, d) or self.inverse.shape != (h, d, d):
            raise ValueError("transform/inverse must be [heads, D, D] matching mean [heads, D]")
        if self.centroids.shape[1] != h or self.centroids.shape[2] * self.centroids.shape[4] != d:
            raise ValueError(
                f"centroids {tuple(self.centroids.shape)} do not tile head_dim {d} over {h} head(s)"
            )

    # ------------------------------------------------------------------ shape helpers
    @property
    def stages(self) -> int:
        return self.centroids.shape[0]

    @property
    def num_heads(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_subspaces(self) -> int:
        return self.centroids.shape[2]

    @property
    def num_centroids(self) -> int:
        return self.centroids.shape[3]

    @property
    def sub_dim(self) -> int:
        return self.centroids.shape[4]

    @property
    def head_dim(self) -> int:
        return self.mean.shape[1]

    @property
    def codes_per_vector(self) -> int:
        return self.stages * self.num_subspaces

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.num_centroids <= 256 else torch.int16

    @property
    def nominal_bits(self) -> float:
        return self.stages * (self.num_centroids.bit_length() - 1) / self.sub_dim

    def storage_bits(self, element_bits: int = 16) -> int:
        """Bits to hold this codebook at ``element_bits`` per number: centroids, mean and the coding map. A dense map is
        one D x D matrix per head (the other is its inverse, computed at load); a map in the RoPE-pair layout
        (:mod:`antkv_compile.numerics.rope_pairs`) is a permutation, stored and used as its pair order, D / 2 indices
        per head."""
        from .rope_pairs import pair_layout

        pairs = pair_layout(self.transform, self.sub_dim)
        map_numel = pairs.numel() if pairs is not None else self.transform.numel()
        return element_bits * (self.centroids.numel() + map_numel + self.mean.numel())

    def tensors(self) -> tuple[Tensor, ...]:
        """The codebook's tensors themselves (``dataclasses.astuple`` would deep-copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Codebook":
        return Codebook(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def select_heads(self, start: int, count: int) -> "Codebook":
        """The codebook of KV heads ``start .. start + count - 1`` (a tensor-parallel rank's heads); a codebook
        shared by all heads (H_cb = 1) is returned as is."""
        if self.num_heads == 1:
            return self
        if start < 0 or count < 1 or start + count > self.num_heads:
            raise ValueError(f"heads {start}..{start + count - 1} out of range for a codebook of {self.num_heads} heads")
        return Codebook(self.centroids[:, start:start + count], self.transform[start:start + count],
                        self.inverse[start:start + count], self.mean[start:start + count])

    def _per_head(self, t: Tensor, num_heads: int) -> Tensor:
        """Broadcast a [H_cb, ...] tensor to [num_heads, ...]."""
        if t.shape[0] == num_heads:
            return t
        if t.shape[0] == 1:
            return t.expand(num_heads, *t.shape[1:])
        raise ValueError(f"codebook has {t.shape[0]} heads, the cache has {num_heads}")

    # ------------------------------------------------------------------ coding space
    def to_coding_space(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] -> x' [B, H, T, D] (float32)."""
        h = x.shape[1]
        mean = self._per_head(self.mean, h)[None, :, None, :]
        tr = self._per_head(self.transform, h)
        return torch.einsum("bhtd,hde->bhte", x.float() - mean, tr)

    def from_coding_space(self, xc: Tensor) -> Tensor:
        h = xc.shape[1]
        inv = self._per_head(self.inverse, h)
        return torch.einsum("bhtd,hde->bhte", xc, inv) + self._per_head(self.mean, h)[None, :, None, :]

    def query_to_coding_space(self, q: Tensor) -> Tensor:
        """q [B, Hkv, G, T, D] -> q' with q·x = q'·x' + q·mean (keys only)."""
        inv = self._per_head(self.inverse, q.shape[1])
        # q·(x' @ inv) = (q @ inv^T)·x'
        return torch.einsum("bhgtd,hed->bhgte", q.float(), inv)

    def query_dot_mean(self, q: Tensor) -> Tensor:
        """q [B, Hkv, G, T, D] -> q·mean [B, Hkv, G, T]."""
        mean = self._per_head(self.mean, q.shape[1])
        return torch.einsum("bhgtd,hd->bhgt", q.float(), mean)

    # ------------------------------------------------------------------ encode / decode
    def encode_coding_space(self, xc: Tensor) -> tuple[Tensor, Tensor]:
        """xc [B, H, T, D] in coding space -> (codes [B, H, T, stages*S], residual [B, H, T, D])."""
        b, h, t, d = xc.shape
        s, sd = self.num_subspaces, self.sub_dim
        cents = self._per_head(self.centroids.transpose(0, 1), h).float()  # [H, stages, S, M, sd]
        codes = torch.empty(b, h, t, self.stages, s, dtype=self.code_dtype, device=xc.device)
        resid = xc.reshape(b, h, t, s, sd).clone()
        head = torch.arange(h, device=xc.device)[None, :, None, None]
        sub = torch.arange(s, device=xc.device)[None, None, None, :]
        for start in range(0, t, _ENCODE_CHUNK):
            sl = slice(start, min(t, start + _ENCODE_CHUNK))
            for stage in range(self.stages):
                c = cents[:, stage]  # [H, S, M, sd]
                r = resid[:, :, sl]  # [B, H, t', S, sd]
                dist = (
                    (c * c).sum(-1)[None, :, None]  # [1, H, 1, S, M]
                    - 2.0 * torch.einsum("bhtsd,hsmd->bhtsm", r, c)
                )
                idx = dist.argmin(-1)  # [B, H, t', S]
                codes[:, :, sl, stage] = idx.to(self.code_dtype)
                resid[:, :, sl] = r - c[head, sub, idx]
        return codes.reshape(b, h, t, self.stages * s), resid.reshape(b, h, t, d)

    def decode_coding_space(self, codes: Tensor) -> Tensor:
        """codes [B, H, T, stages*S] -> x' [B, H, T, D] (float32)."""
        b, h, t, _ = codes.shape
        st, s, m, sd = self.stages, self.num_subspaces, self.num_centroids, self.sub_dim
        cents = self._per_head(self.centroids.transpose(0, 1), h).float()  # [H, stages, S, M, sd]
        # one flat gather (embedding) of rows (head, stage, sub-space, code): ~10x faster on a CPU than indexing
        base = torch.arange(h * st * s, device=codes.device).view(h, st, s) * m
        rows = F.embedding(codes.reshape(b, h, t, st, s).long() + base[None, :, None], cents.reshape(-1, sd))
        return (rows.sum(3) if st > 1 else rows[:, :, :, 0]).reshape(b, h, t, s * sd)

    def encode(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] -> codes [B, H, T, stages*S]."""
        return self.encode_coding_space(self.to_coding_space(x))[0]

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """codes -> reconstructed vectors [B, H, T, D]."""
        return self.from_coding_space(self.decode_coding_space(codes)).to(dtype)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (codes, x_hat) with x_hat = decode(codes) in x's dtype."""
        codes = self.encode(x)
        return codes, self.decode(codes, dtype=x.dtype)


def identity_codebook(centroids: Tensor) -> Codebook:
    """A codebook whose coding space is the raw vector space (plain VQ)."""
    h = centroids.shape[1]
    d = centroids.shape[2] * centroids.shape[4]
    eye = torch.eye(d, dtype=torch.float32).expand(h, d, d).clone()
    return Codebook(centroids.float(), eye, eye.clone(), torch.zeros(h, d))


def random_codebook(preset: VQPreset, num_heads: int, head_dim: int, *, generator: torch.Generator | None = None,
                    scale: float = 1.0) -> Codebook:
    """A random plain-VQ codebook (tests and codebook-free fallbacks)."""
    s = preset.num_subspaces(head_dim)
    cents = torch.randn(preset.stages, num_heads, s, preset.num_centroids, preset.sub_dim, generator=generator)
    # later stages code smaller residuals
    decay = torch.tensor([0.5**i for i in range(preset.stages)])[:, None, None, None, None]
    return identity_codebook(cents * decay * scale)
