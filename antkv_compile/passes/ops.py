"""The op the rewrite inserts: ``torch.ops.antkv_rt.cache_attend``.

``cache_attend(q, k, v, position, mask, session, layer, capacity, scale) -> out``

* q [B, Hq, T, D] (post-RoPE queries), k/v [B, Hkv, T, D] (the T *new* keys/values, post-RoPE), position:
  int tensor whose first element is the absolute position of the first new token (HF's
  ``cache_position``), mask: the model's attention mask (bool, True = attend, or additive) or None,
  session/layer: which store (see :mod:`antkv_compile.runtime.state`), capacity: the static cache length,
  scale: softmax scale. Returns the attention output [B, Hq, T, D] in q's dtype -- exactly what the
  replaced ``scaled_dot_product_attention`` (or eager matmul-softmax-matmul) returned.
* Semantics: append the new tokens to the layer's quantized store, then attend (the store does both in
  one call, so the write is ordered before the read by construction: the new tokens are visible to their
  own queries, causally). At position 0 the store is started afresh (prompt / ``cache.reset()``).
* Opaque stateful design (documented, deliberate): the store (codes, anchors, window) is Python-side
  state, not a tensor argument, so ``mutates_args=()``. What keeps this sound under Inductor: the op's
  output is always used (no DCE), one call per layer per step with data dependencies between layers (no
  reordering that matters), no CSE of distinct calls (their inputs differ), the fake kernel never touches
  state, and the op is a pure function of its inputs whenever ``position`` starts at 0 (``opcheck`` is
  run that way). Out-of-sequence calls raise instead of returning wrong values.
* The mask is checked at run time to be the plain causal mask over the tokens held (no padding / custom
  masks): a model run with a padding mask raises instead of silently ignoring it.

The namespace ``antkv_rt`` keeps it apart from the kernel ops of :mod:`antkv_compile.kernels.ops`
(``antkv::...``); a CUDA implementation can be registered later with ``cache_attend.register_kernel``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from ..numerics.store import CacheInputError

__all__ = ["cache_attend", "mask_is_causal"]


def mask_is_causal(mask: Tensor, start: int, t: int) -> bool:
    """True when ``mask`` ([..., T, L], bool True=attend or additive 0=attend) lets query ``start + i`` see
    exactly keys ``0..start + i`` among the ``min(L, start + t)`` positions held."""
    n = min(mask.shape[-1], start + t)
    m = mask[..., -t:, :n] if mask.shape[-2] >= t else mask[..., :n]
    allowed = m if m.dtype == torch.bool else (m == 0)
    q_pos = torch.arange(start, start + t, device=mask.device)
    k_pos = torch.arange(n, device=mask.device)
    expected = k_pos[None, :] <= q_pos[:, None]
    if allowed.shape[-2] == 1 and t > 1:
        return False
    return bool((allowed == expected).all())


@custom_op("antkv_rt::cache_attend", mutates_args=())
def cache_attend(q: Tensor, k: Tensor, v: Tensor, position: Tensor, mask: Optional[Tensor], session: int,
                 layer: int, capacity: int, scale: float) -> Tensor:
    from ..runtime.state import get_session

    s = get_session(session)
    start = int(position.reshape(-1)[0])
    t = k.shape[2]
    if mask is not None and s.check_mask and not mask_is_causal(mask, start, t):
        raise CacheInputError(
            f"layer {layer}: the attention mask is not the plain causal mask over positions 0..{start + t - 1} "
            "(padding or a custom mask); the antkv store supports unpadded causal attention only -- run "
            "unpadded batches, or compile with backend='inductor'")
    store = s.store_for(layer, q, k, v, start, capacity, scale)
    out = store.attend(q, k, v, check_finite=s.config.check_finite).contiguous()
    _compact_window(store)
    return out


def _compact_window(store) -> None:
    """After a flush the store's window tensors are views of the whole chunk (a prefill keeps its full
    K/V/Q alive through them): copy them out so only the window's own tokens stay allocated."""
    for name in ("win_k", "win_v", "win_q", "win_out", "win_lse"):
        t = getattr(store, name, None)
        if t is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            setattr(store, name, t.clone())


@cache_attend.register_fake
def _cache_attend_fake(q, k, v, position, mask, session, layer, capacity, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
