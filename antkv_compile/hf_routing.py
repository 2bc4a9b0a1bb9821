"""Route a Hugging Face model's attention layers through a Python handler (eager path).

Calibration and the perplexity harness run the real model, unchanged, with its attention
implementation switched to ``"antkv_route"``: every attention layer then calls
``handler(layer_index, query, key, value, scale)`` with post-RoPE query/key/value of the *new*
tokens ([B, H, T, D]), and the handler returns the attention output [B, Hq, T, D]. The model is
run without a cache and with explicit ``position_ids``, so the handler owns all past state.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

NAME = "antkv_route"
Handler = Callable[[int, Tensor, Tensor, Tensor, float], Tensor]
_HANDLER: contextvars.ContextVar[Handler | None] = contextvars.ContextVar("antkv_handler", default=None)
_registered = False


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler = _HANDLER.get()
    if handler is None:
        raise RuntimeError(f"attn_implementation={NAME!r} is only usable inside antkv_compile.hf_routing.routed()")
    if getattr(module.config, "sliding_window", None) and getattr(module, "sliding_window", None):
        raise NotImplementedError("sliding-window attention layers are not routed by the eager harness")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = handler(module.layer_idx, query, key, value, float(scale))
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _attention)
        _registered = True


@contextlib.contextmanager
def routed(model, handler: Handler) -> Iterator[None]:
    """Within the block, ``model``'s attention calls ``handler``."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    token = _HANDLER.set(handler)
    try:
        yield
    finally:
        _HANDLER.reset(token)
        model.set_attn_implementation(previous)


def chunk_logits(model, input_ids: Tensor, start: int) -> Tensor:
    """Run ``input_ids`` [B, T] at absolute positions start..start+T-1 without a cache."""
    b, t = input_ids.shape
    pos = torch.arange(start, start + t, device=input_ids.device)[None].expand(b, t)
    return model(input_ids=input_ids, position_ids=pos, use_cache=False).logits
