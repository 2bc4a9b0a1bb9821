"""Rotary position embedding in the Hugging Face convention (rotate_half: dims i and i + D/2 pair up).

Used to quantize keys *before* RoPE: a post-RoPE key k at position m is unrotated to R(-m) k,
coded, and rotated back after decoding. ``RopeTable`` wraps the model's own rotary module so the
frequencies (and any scaling) are exactly the model's.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """R(m) x for x [..., T, D], cos/sin [T, D]."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse of :func:`rotate` (also when cos/sin carry an attention scaling factor)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


class RopeTable:
    """cos/sin at given positions from a Hugging Face rotary embedding module."""

    def __init__(self, rotary_module, head_dim: int) -> None:
        self.rotary = rotary_module
        self.head_dim = head_dim

    @classmethod
    def from_model(cls, model) -> "RopeTable":
        return cls(model.model.rotary_emb, model.model.layers[0].self_attn.head_dim)

    @torch.no_grad()
    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        cos, sin = self.rotary(probe, positions[None].long())
        return cos[0].float(), sin[0].float()


class InvFreqRope:
    """cos/sin of the default (static) RoPE from stored inverse frequencies, as an artifact carries them."""

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)
        self.head_dim = 2 * inv_freq.numel()

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def model_rope_parameters(model) -> tuple[Tensor, float]:
    """(inv_freq, attention_scaling) of a Hugging Face model's rotary embedding."""
    rot = model.model.rotary_emb
    return rot.inv_freq.detach().float().cpu().clone(), float(getattr(rot, "attention_scaling", 1.0))
