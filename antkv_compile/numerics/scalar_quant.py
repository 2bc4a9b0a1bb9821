"""KIVI-style grouped asymmetric scalar quantization (the scalar baseline).

Keys are quantized per channel over a group of tokens (outlier channels get their own range),
values per token over groups of channels, each group with its own minimum and step stored in
fp16 (counted in the bits). Round-to-nearest on 2**bits levels.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


def _fake_quant(x: Tensor, dim: int, bits: int) -> Tensor:
    """Asymmetric round-to-nearest along ``dim`` (the group), in float32."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    step = ((hi - lo) / levels).clamp_min(1e-8)
    return ((x - lo) / step).round().clamp(0, levels) * step + lo


@dataclasses.dataclass(frozen=True)
class ScalarQuantizer:
    bits: int
    value_group: int = 32
    meta_bits: int = 16

    def quantize_keys(self, k: Tensor) -> tuple[Tensor, int]:
        """k [B, H, T, D]: one (min, step) per channel over the T tokens of the group."""
        out = _fake_quant(k.float(), dim=2, bits=self.bits).to(k.dtype)
        b, h, t, d = k.shape
        return out, k.numel() * self.bits + b * h * d * 2 * self.meta_bits

    def quantize_values(self, v: Tensor) -> tuple[Tensor, int]:
        """v [B, H, T, D]: one (min, step) per token per group of ``value_group`` channels."""
        b, h, t, d = v.shape
        g = self.value_group if d % self.value_group == 0 else d
        grouped = v.float().reshape(b, h, t, d // g, g)
        out = _fake_quant(grouped, dim=4, bits=self.bits).reshape(b, h, t, d).to(v.dtype)
        return out, v.numel() * self.bits + b * h * t * (d // g) * 2 * self.meta_bits
