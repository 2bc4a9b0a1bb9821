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
* Inference only: the store is not differentiable. The backend compiles and runs a rewritten graph under
  ``torch.no_grad()`` (so the model works with grad mode on, Hugging Face's default outside ``generate``, and
  under ``torch.inference_mode()``; its outputs carry no autograd graph), and a backward through the op
  called directly raises :data:`NO_BACKWARD`.
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

__all__ = ["cache_attend", "mask_is_causal", "non_finite_problem", "step_facts"]


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


def _causal_flag(mask: Tensor, position: Tensor, t: int) -> Tensor:
    """On the device (no host sync): 1 when ``mask`` lets query ``p + i`` (p = position[0]) see exactly keys
    ``0..p + i`` among the ``min(L, p + t)`` positions held -- :func:`mask_is_causal` without reading p first."""
    m = mask[..., -t:, :] if mask.shape[-2] >= t else mask
    allowed = m if m.dtype == torch.bool else (m == 0)
    p0 = position.reshape(-1)[:1].to(device=mask.device, dtype=torch.long)
    q_pos = p0 + torch.arange(t, device=mask.device)
    k_pos = torch.arange(mask.shape[-1], device=mask.device)
    expected = k_pos[None, :] <= q_pos[:, None]
    held = k_pos[None, :] < p0 + t  # columns past the held positions are not checked
    return ((allowed == expected) | ~held).all().to(torch.long)


def step_facts(s, layer: int, position: Tensor, mask: Optional[Tensor], t: int) -> tuple[int, bool]:
    """(start position, mask is plain causal) of this call, read from the device once per forward: every layer
    of one forward gets the same positions and mask, so the layers after the first reuse what the first read
    (a forward is recognised by the layer index increasing; a lower index starts a new one). One host sync per
    decode step instead of two per layer, which let the GPU run dry between layers."""
    check = mask is not None and s.check_mask
    key = (t, tuple(position.shape), None if not check else tuple(mask.shape), mask is None)
    cached = s._step_facts
    if cached is not None and layer > cached[0] and cached[1] == key:
        s._step_facts = (layer,) + cached[1:]
        return cached[2], cached[3]
    if check and mask.shape[-2] == 1 and t > 1:
        start, ok = int(position.reshape(-1)[0]), False
    elif check:
        flag = _causal_flag(mask, position, t)
        start, ok_i = torch.stack([position.reshape(-1)[0].to(flag.device, torch.long), flag]).tolist()
        ok = bool(ok_i)
    else:
        start, ok = int(position.reshape(-1)[0]), True
    s._step_facts = (layer, key, start, ok)
    return start, ok


@custom_op("antkv_rt::cache_attend", mutates_args=())
def cache_attend(q: Tensor, k: Tensor, v: Tensor, position: Tensor, mask: Optional[Tensor], session: int,
                 layer: int, capacity: int, scale: float) -> Tensor:
    from ..runtime.state import get_session

    s = get_session(session)
    t = k.shape[2]
    start, causal = step_facts(s, layer, position, mask, t)
    if not causal:
        raise CacheInputError(
            f"layer {layer}: the attention mask is not the plain causal mask over positions 0..{start + t - 1} "
            "(padding or a custom mask); the antkv store supports unpadded causal attention only -- run "
            "unpadded batches, or compile with backend='inductor'")
    check = s.config.check_finite
    if check:
        problem = non_finite_problem(layer, k, v)
        if problem:
            raise CacheInputError(problem)
    store = s.store_for(layer, q, k, v, start, capacity, scale)
    out = store.attend(q, k, v, check_finite=False).contiguous()  # checked above, with the cause
    _compact_window(store)
    return out


def non_finite_problem(layer: int, k: Tensor, v: Tensor) -> str | None:
    """None when the new keys and values are finite, else a message whose hint matches the cause: in float16 a
    NaN/Inf is most often an overflow of the activations; in float32 / bfloat16 (range of float32) it came in
    with the model's inputs (``inputs_embeds``, custom embeddings) or weights."""
    if bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
        return None
    kinds = " and ".join(name for name, bad in (("NaN", bool(torch.isnan(k).any() | torch.isnan(v).any())),
                                                ("Inf", bool(torch.isinf(k).any() | torch.isinf(v).any()))) if bad)
    head = f"layer {layer}: the new keys or values contain {kinds}"
    if k.dtype == torch.float16:
        return (f"{head}; in float16 this is usually an overflow of the model's activations: run the model in "
                "bfloat16 or float32, or check the inputs for NaN/Inf")
    return (f"{head} ({str(k.dtype).removeprefix('torch.')} does not overflow here): they came in with the model's "
            "inputs or weights -- check input_ids / inputs_embeds (torch.isfinite(x).all()) and the weights; "
            "the antkv store cannot code non-finite values")


def _compact_window(store) -> None:
    """After a flush the store's window tensors are views of the whole chunk (a prefill keeps its full
    K/V/Q alive through them): copy them out so only the window's own tokens stay allocated. Stores that keep
    their window in preallocated buffers (``window_in_buffers``: KernelLayerStore) are left alone: their views
    are the point, and copying them out would reallocate the buffers every step."""
    if getattr(store, "window_in_buffers", False):
        return
    for name in ("win_k", "win_v", "win_q", "win_out", "win_lse"):
        t = getattr(store, name, None)
        if t is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            setattr(store, name, t.clone())


NO_BACKWARD = ("antkv_rt.cache_attend has no backward: the compressed KV cache is for inference only; run the "
               "model under torch.no_grad() or torch.inference_mode(), or compile with backend='inductor' to train")


def _backward(ctx, grad):
    raise RuntimeError(NO_BACKWARD)


cache_attend.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)


@cache_attend.register_fake
def _cache_attend_fake(q, k, v, position, mask, session, layer, capacity, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
