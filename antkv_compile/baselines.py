"""Full-precision baselines for the end-to-end benchmark: a Hugging Face attention function that decodes with the
dense split-K kernel (``torch.ops.antkv.dense_decode_attention``) over the model's own static KV cache.

Usage (transformers 5.x)::

    from antkv_compile import baselines
    baselines.register()                                   # also done on import
    model.set_attn_implementation(baselines.NAME)          # "antkv_dense_decode"
    model.generate(ids, cache_implementation="static", ...)  # compiled or not

Inside the attention function (signature of transformers' ``sdpa_attention_forward``):

* decode-sized steps (G * T <= 64 query rows per KV head, G = Hq / Hkv): the op reads the cache buffers
  ``key``/``value`` [B, Hkv, L, D] in place (no ``repeat_kv`` copy, each valid byte read once). The number of
  valid positions per sequence is derived on the device, without a host sync, from (first found)
  ``kwargs["cache_position"]`` (older transformers) -> ``cache_position[-1] + 1``; ``kwargs["position_ids"]``
  (what Llama-family models pass in 5.x) -> ``position_ids[:, -1] + 1``; a 4-D boolean mask -> 1 + the last
  visible key of the last query row; else the whole buffer (a dynamic cache / no cache holds exactly the
  visible keys). The attention mask is otherwise ignored in these steps: padded batches (holes in the cache)
  are not supported by the decode path.
* longer steps (prefill): torch SDPA. No mask (transformers' signal for a causal prefill from position 0,
  the static cache being empty beyond the new tokens): ``is_causal=True, enable_gqa=True`` on the first T
  cache entries only. With a mask: SDPA with the mask and ``enable_gqa=True`` on the CPU; on CUDA the keys are
  expanded (``repeat_kv``) instead, as transformers does, because masked GQA SDPA falls back to the math
  kernel there (O(T * L) memory).
* sliding-window layers and soft-capped logits are delegated to transformers' ``sdpa_attention_forward``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.antkv.*)
from .kernels.dense_decode import MAX_ROWS

NAME = "antkv_dense_decode"
_registered = False


def _sequence_lengths(query: Tensor, key: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor:
    """int32 [B]: valid cache positions of each sequence after this step's T new tokens were written."""
    b, t, cap = query.shape[0], query.shape[2], key.shape[2]
    dev = query.device
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        last = cache_position.reshape(-1)[-1:] + 1
        return last.to(device=dev, dtype=torch.int32).expand(b).contiguous()
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == t:
        last = position_ids[:, -1] + 1
        return last.to(device=dev, dtype=torch.int32).expand(b).contiguous()
    if isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]  # [B or 1, L]
        idx = torch.arange(1, row.shape[-1] + 1, device=row.device)
        return torch.where(row, idx, 0).amax(-1).to(device=dev, dtype=torch.int32).expand(b).contiguous()
    return torch.full((b,), cap, dtype=torch.int32, device=dev)


def _prefill(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scale: float,
             dropout: float, groups: int) -> Tensor:
    t = query.shape[2]
    if attention_mask is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :t], value[:, :, :t], dropout_p=dropout, scale=scale, is_causal=True,
            enable_gqa=groups > 1)
    if query.is_cuda and groups > 1:
        b, hkv, cap, d = key.shape
        key = key[:, :, None].expand(b, hkv, groups, cap, d).reshape(b, hkv * groups, cap, d)
        value = value[:, :, None].expand(b, hkv, groups, cap, value.shape[-1]).reshape(b, hkv * groups, cap, -1)
        groups = 1
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale, enable_gqa=groups > 1)


def dense_decode_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                   attention_mask: Tensor | None, scaling: float | None = None,
                                   dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers AttentionInterface function: query [B, Hq, T, D], key/value [B, Hkv, L, D] (the whole static
    cache, the T new tokens already written) -> (attn_output [B, T, Hq, D], None)."""
    if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None) or query.shape[1] % key.shape[1]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, hq, t, d = query.shape
    groups = hq // key.shape[1]
    scale = float(scaling) if scaling is not None else d ** -0.5
    if groups * t <= MAX_ROWS and key.shape[-1] == value.shape[-1] == d and d >= 16 and d & (d - 1) == 0:
        lengths = _sequence_lengths(query, key, attention_mask, kwargs)
        out, _ = torch.ops.antkv.dense_decode_attention(query, key, value, lengths, scale)
    else:
        out = _prefill(query, key, value, attention_mask, scale, dropout, groups)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function (and, for its masks, transformers' SDPA mask builder) under NAME."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, dense_decode_attention_forward)
        AttentionMaskInterface.register(NAME, AttentionMaskInterface._global_mapping["sdpa"])
        _registered = True
    return NAME


register()

__all__ = ["NAME", "dense_decode_attention_forward", "register"]
