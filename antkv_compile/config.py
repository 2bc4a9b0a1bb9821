"""Quantization presets and the run-time configuration of the AnTKV cache.

A preset fixes the shape of the product vector quantizer: each head vector of dimension D is cut
into D / sub_dim sub-vectors, and each sub-vector is coded by ``stages`` indices into codebooks of
2**code_bits centroids (``stages > 1`` is residual VQ: stage s codes what stages < s left over).
Nominal bits per element = stages * code_bits / sub_dim (codes only; anchors, the window and the
codebooks are counted separately as *effective* bits by :mod:`antkv_compile.numerics.accounting`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

ScoreKind = Literal["ans", "sensitivity", "attention", "random", "none"]
SCORE_KINDS: tuple[str, ...] = ("ans", "sensitivity", "attention", "random", "none")


@dataclasses.dataclass(frozen=True)
class VQPreset:
    """Shape of one product/residual vector quantizer."""

    name: str
    sub_dim: int
    code_bits: int
    stages: int = 1

    @property
    def nominal_bits(self) -> float:
        return self.stages * self.code_bits / self.sub_dim

    @property
    def num_centroids(self) -> int:
        return 1 << self.code_bits

    def num_subspaces(self, head_dim: int) -> int:
        if head_dim % self.sub_dim:
            raise ValueError(
                f"preset {self.name!r} cuts head vectors into sub-vectors of {self.sub_dim}, "
                f"which does not divide head_dim={head_dim}; pick a preset whose sub_dim divides it"
            )
        return head_dim // self.sub_dim


# The presets named by nominal bits per element. 1-bit = 8-dim sub-vectors with 256 centroids
# (the paper's setting); 0.375-bit = 16-dim sub-vectors with 64 centroids.
PRESETS: dict[str, VQPreset] = {
    "4": VQPreset("4", sub_dim=2, code_bits=8),
    "2": VQPreset("2", sub_dim=4, code_bits=8),
    "1": VQPreset("1", sub_dim=8, code_bits=8),
    "0.75": VQPreset("0.75", sub_dim=8, code_bits=6),
    "0.375": VQPreset("0.375", sub_dim=16, code_bits=6),
}


def get_preset(bits: str | float | VQPreset) -> VQPreset:
    if isinstance(bits, VQPreset):
        return bits
    key = str(bits)
    if key not in PRESETS:
        # accept 1.0 / "1.0" for "1"
        try:
            as_float = float(key)
        except ValueError:
            as_float = math.nan
        for name in PRESETS:
            if float(name) == as_float:
                return PRESETS[name]
        raise ValueError(f"unknown bits preset {bits!r}; choose one of {sorted(PRESETS, key=float)}")
    return PRESETS[key]


@dataclasses.dataclass(frozen=True)
class AnTKVConfig:
    """Run-time knobs of the quantized store (the codebooks come from an artifact).

    anchor_ratio: fraction of tokens per (layer, KV head, sequence) kept in full precision.
    window: most full-precision recent tokens; when it fills, its oldest ``flush`` tokens are scored
        over the queries seen since they arrived, the best become anchors and the rest are encoded.
    flush: tokens moved out of the window at a time (default window // 2, so the newest half of the
        window always stays exact; flush = window empties it).
    score: how anchors are chosen: "ans" (Anchor Score with each token's actual quantization
        residual), "sensitivity" (the same first-order factors without the token's residual),
        "attention" (accumulated attention, H2O-style), "random", or "none" (no anchors).
    score_row_stride: a long window (a prefill chunk) is scored over every query row within ``score_band``
        rows of a token, and beyond that over every R-th row only, weighted R: query head g of a KV head's G
        reads the rows with (i + g) % R == 0 (``numerics.anchor_score.row_sample_weights``). About R times less
        work for a long prefill's Anchor Scores; on SmolLM2 the sampled scores keep 97.7 % of the exact anchors
        (``benchmarks/results/score_sampling_recall.json``). None (default) = G, so that every row is read by
        one of the G heads; 1 = every row of every head (exact). Decode flushes (window <= band) are exact.
    score_band: rows within this many tokens of a token always count (default 256).
    value_mode: how the VQ part of attention reads values: "histogram" (accumulate probability
        mass per centroid, then one small matmul with the codebook) or "gather".
    coded_path: "lut" attends on the codes through per-query lookup tables (what the kernels do);
        "dequantized" decodes the codes on the fly (in chunks, keys rotated by position when pre-RoPE) and
        attends with dense matmuls; the store keeps no decoded copy. Both compute the same function
        (tested); the perplexity harness uses "dequantized" because dense matmuls are much faster on a CPU.
    key_space: code keys after RoPE (as the model caches them; lookup tables work) or before it
        (unrotated by position, coded in RoPE-pair sub-spaces, rotated back after decoding; dequantized
        path only in the reference store).
    capacity: tokens per sequence the compiled model's store holds (default: the static cache's
        ``max_cache_len``). Larger than the static cache lets the dense cache be allocated small
        (it is never read after the rewrite) while the store holds a long context.
    store: which layer store the compiled model runs: "kernels" (the ``antkv::`` ops: Triton on CUDA),
        "reference" (the plain-PyTorch method core), or "auto" (kernels on CUDA where they support the
        configuration, the reference otherwise).
    offload: None, or "host": the tiered retrieval mode (issue 19). A full-precision copy of every coded token
        is kept in host memory (pinned on CUDA), written as tokens are coded; each step scores the coded tokens
        on their codes, retrieves the best ``retrieve_fraction`` of them (at least ``retrieve_min``) from the
        copy and attends over them exactly (``numerics/retrieval.py``).
    retrieve_fraction: share of the coded tokens retrieved per (layer, KV head, sequence) and step, in [0, 1].
    retrieve_min: the fewest tokens retrieved (while there are that many coded non-anchor tokens).
    """

    bits: str | VQPreset = "1"
    anchor_ratio: float = 0.01
    window: int = 64
    flush: int | None = None
    score: ScoreKind = "ans"
    score_row_stride: int | None = None
    score_band: int = 256
    value_mode: Literal["histogram", "gather"] = "histogram"
    coded_path: Literal["lut", "dequantized"] = "lut"
    key_space: Literal["post_rope", "pre_rope"] = "post_rope"
    check_finite: bool = True
    seed: int = 0
    capacity: int | None = None
    store: Literal["auto", "reference", "kernels"] = "auto"
    offload: Literal["host"] | None = None
    retrieve_fraction: float = 0.02
    retrieve_min: int = 64

    def __post_init__(self) -> None:
        get_preset(self.bits)
        if not 0.0 <= self.anchor_ratio <= 1.0:
            raise ValueError(f"anchor_ratio must be in [0, 1], got {self.anchor_ratio}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")
        if self.flush is not None and not 1 <= self.flush <= self.window:
            raise ValueError(f"flush must be in [1, window={self.window}], got {self.flush}")
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {SCORE_KINDS}, got {self.score!r}")
        if self.score_row_stride is not None and self.score_row_stride < 1:
            raise ValueError(f"score_row_stride must be >= 1 (or None for the query heads per KV head), "
                             f"got {self.score_row_stride}")
        if self.score_band < 1:
            raise ValueError(f"score_band must be >= 1 token, got {self.score_band}")
        if self.key_space not in ("post_rope", "pre_rope"):
            raise ValueError(f"key_space must be 'post_rope' or 'pre_rope', got {self.key_space!r}")
        if self.key_space == "pre_rope" and self.coded_path != "dequantized":
            raise ValueError("pre-RoPE keys are rotated after decoding: use coded_path='dequantized'")
        if self.coded_path not in ("lut", "dequantized"):
            raise ValueError(f"coded_path must be 'lut' or 'dequantized', got {self.coded_path!r}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens, got {self.capacity}")
        if self.store not in ("auto", "reference", "kernels"):
            raise ValueError(f"store must be 'auto', 'reference' or 'kernels', got {self.store!r}")
        if self.value_mode not in ("histogram", "gather"):
            raise ValueError(f"value_mode must be 'histogram' or 'gather', got {self.value_mode!r}")
        from .options import check_offload

        check_offload(self.offload, self.retrieve_fraction, self.retrieve_min)

    @property
    def preset(self) -> VQPreset:
        return get_preset(self.bits)

    @property
    def flush_size(self) -> int:
        return self.flush if self.flush is not None else max(1, self.window // 2)

    def row_stride_for(self, group: int) -> int:
        """The score's row stride R for ``group`` query heads per KV head."""
        return self.score_row_stride if self.score_row_stride is not None else max(1, group)

    def anchors_for(self, num_tokens: int) -> int:
        """How many anchors a (layer, KV head, sequence) keeps after ``num_tokens`` are coded."""
        if self.score == "none" or self.anchor_ratio == 0.0:
            return 0
        return min(num_tokens, math.ceil(self.anchor_ratio * num_tokens))
