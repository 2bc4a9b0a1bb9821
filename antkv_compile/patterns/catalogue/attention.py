"""Catalogue of attention computations, one function per graph shape.  Each takes the candidate *output*
node (the SDPA call, or the final ``matmul`` of the eager path) and returns an ``AttentionMatch`` or None.
The matchers record what they see (mask, window, dropout, softcap...); whether a match is *supported* is
decided by ``find_attention_sites``.

Shapes (Dynamo graph, torch 2.13 / transformers 5.23, ``integrations/sdpa_attention.py`` and each model's
``eager_attention_forward``):

``sdpa_gqa`` -- HF passes ``enable_gqa=True`` when there is no mask (``use_gqa_in_sdpa``: DynamicCache
  decode, prefill on an empty cache) and head_dim <= 256; K/V are the cache itself, or its prefix::

    torch._C._nn.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0,
                                              scale=s, is_causal=False|True, enable_gqa=True)
    # prefill on an empty StaticCache: keys[:, :, :q_len], is_causal=True

``sdpa_repeat_kv`` -- with a mask (every StaticCache step), GQA goes through ``repeat_kv``::

    key = keys[:, :, None, :, :].expand(B, H_kv, n_rep, L, D).reshape(B, H_q, L, D)
    torch._C._nn.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=0.0, scale=s,
                                              is_causal=False)

``sdpa_mha`` -- no GQA (H_q == H_kv): K/V straight from the cache, with or without a mask.

``eager`` / ``eager_repeat_kv`` -- ``attn_implementation="eager"``::

    w = torch.matmul(q, repeat_kv(keys).transpose(2, 3)) * s          # or / sqrt(D); or q * s first
    [w = torch.tanh(w / c) * c]                                         # softcapping (Gemma 2/3)
    [w = w + mask]                                                      # mask may be m[:, :, :, :L]
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)          # casts optional
    p = F.dropout(p, p=dropout, training=...)                          # kept in the graph even at p=0
    out = torch.matmul(p, repeat_kv(values))
"""

from __future__ import annotations

import math

import torch.fx as fx

from .. import predicates as P
from ..chains import KVChain, strip, unwrap_kv
from ..masks import analyze_mask
from ..matches import AttentionMatch

__all__ = [
    "match_sdpa_gqa",
    "match_sdpa_repeat_kv",
    "match_sdpa_mha",
    "match_eager_attention",
]


def _int(x):
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _build(pattern, node, query, key, value, kc: KVChain, vc: KVChain, mask_node, *, scale, is_causal, dropout_p,
           enable_gqa, softcap=None, nodes=()) -> AttentionMatch:
    qs = P.shape_of(query)
    ks = P.shape_of(kc.source)
    kv_consumed = P.shape_of(key)
    num_heads = _int(qs[1]) if qs and len(qs) == 4 else None
    head_dim = _int(qs[-1]) if qs else None
    q_len = _int(qs[-2]) if qs and len(qs) >= 2 else None
    num_kv_heads = _int(ks[1]) if ks and len(ks) == 4 else None
    kv_len = _int(kv_consumed[-2]) if kv_consumed and len(kv_consumed) >= 2 else None
    if kc.groups is not None:
        groups = kc.groups
    elif num_heads is not None and num_kv_heads:
        groups = num_heads // num_kv_heads if num_heads % num_kv_heads == 0 else None
    else:
        groups = None
    if scale is None and head_dim:
        scale = 1.0 / math.sqrt(head_dim)  # SDPA default
    mask = None
    if isinstance(mask_node, fx.Node):
        mask = analyze_mask(mask_node, q_len=q_len, kv_len=kv_len, num_heads=num_heads)
    return AttentionMatch(
        pattern=pattern, node=node, query=query, key=key, value=value, key_source=kc.source,
        value_source=vc.source, mask=mask, scale=float(scale) if scale is not None else None,
        is_causal=bool(is_causal), dropout_p=float(dropout_p), enable_gqa=bool(enable_gqa), gqa_groups=groups,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, q_len=q_len, kv_len=kv_len,
        kv_limit=kc.limit, softcap=softcap, nodes=tuple(nodes) + kc.nodes + vc.nodes,
    )


def _sdpa_args(node):
    """(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) of an SDPA call, or None."""
    if not P.is_sdpa(node):
        return None
    q = P.call_arg(node, 0, "query")
    k = P.call_arg(node, 1, "key")
    v = P.call_arg(node, 2, "value")
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    mask = P.call_arg(node, 3, "attn_mask")
    dropout_p = P.call_arg(node, 4, "dropout_p", 0.0)
    is_causal = P.call_arg(node, 5, "is_causal", False)
    scale = P.call_arg(node, -1, "scale")
    enable_gqa = P.call_arg(node, -1, "enable_gqa", False)
    if not isinstance(dropout_p, (int, float)) or not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return None  # symbolic flags: not a shape we know
    if scale is not None and P.const_number(scale) is None:
        return None
    if mask is not None and not isinstance(mask, fx.Node):
        return None
    return q, k, v, mask, dropout_p, is_causal, scale, enable_gqa


def _sdpa_with_kv(node, enable_gqa: bool):
    """SDPA arguments plus the unwrapped K/V chains, when the node's ``enable_gqa`` is as asked."""
    a = _sdpa_args(node)
    if a is None or bool(a[7]) != enable_gqa:
        return None
    return (*a[:7], unwrap_kv(a[1]), unwrap_kv(a[2]))


def match_sdpa_gqa(node) -> AttentionMatch | None:
    """SDPA with ``enable_gqa=True``; K/V are the cache (or its prefix), no ``repeat_kv``."""
    a = _sdpa_with_kv(node, True)
    if a is None:
        return None
    q, k, v, mask, dropout_p, is_causal, scale, kc, vc = a
    if kc.groups is not None or vc.groups is not None:
        return None
    return _build("sdpa_gqa", node, q, k, v, kc, vc, mask, scale=scale, is_causal=is_causal,
                  dropout_p=dropout_p, enable_gqa=True, nodes=(node,))


def match_sdpa_repeat_kv(node) -> AttentionMatch | None:
    """SDPA (no ``enable_gqa``) whose K and V both come through a ``repeat_kv`` chain with the same n_rep."""
    a = _sdpa_with_kv(node, False)
    if a is None:
        return None
    q, k, v, mask, dropout_p, is_causal, scale, kc, vc = a
    if kc.groups is None or kc.groups != vc.groups:
        return None
    return _build("sdpa_repeat_kv", node, q, k, v, kc, vc, mask, scale=scale, is_causal=is_causal,
                  dropout_p=dropout_p, enable_gqa=False, nodes=(node,))


def match_sdpa_mha(node) -> AttentionMatch | None:
    """SDPA (no ``enable_gqa``, no ``repeat_kv``) with as many K/V heads as query heads."""
    a = _sdpa_with_kv(node, False)
    if a is None:
        return None
    q, k, v, mask, dropout_p, is_causal, scale, kc, vc = a
    if kc.groups is not None or vc.groups is not None:
        return None
    qs, ks = P.shape_of(q), P.shape_of(kc.source)
    if qs is not None and ks is not None and (len(qs) != 4 or len(ks) != 4 or qs[1] != ks[1]):
        return None
    return _build("sdpa_mha", node, q, k, v, kc, vc, mask, scale=scale, is_causal=is_causal,
                  dropout_p=dropout_p, enable_gqa=False, nodes=(node,))


# ---------------------------------------------------------------------------------------------------
# eager


def _const_operand(node) -> tuple | None:
    """For a binary op with exactly one Python-number operand: (tensor operand, number)."""
    if len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and P.const_number(b) is not None:
        return a, P.const_number(b)
    if isinstance(b, fx.Node) and P.const_number(a) is not None:
        return b, P.const_number(a)
    return None


def reaches_matmul(node, depth: int = 8) -> bool:
    """Whether ``node`` is (a scaled / soft-capped / cast version of) a matmul output."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if P.is_matmul(node):
            return True
        if P.is_mul(node) or P.is_div(node) or P.is_tanh(node) or P.is_dtype_cast(node) or P.is_add(node):
            nxt = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if P.is_add(node) and len(nxt) == 2:
                return any(reaches_matmul(a, depth - 1) for a in nxt)
            if not nxt:
                return False
            node = nxt[0]
            continue
        return False
    return False


def _softcap(node) -> tuple | None:
    """``tanh(x / c) * c`` -> (x, c, nodes)."""
    if not P.is_mul(node):
        return None
    co = _const_operand(node)
    if co is None or not P.is_tanh(co[0]):
        return None
    tanh = co[0]
    inner = tanh.args[0] if tanh.args else None
    if not P.is_div(inner):
        return None
    ci = _const_operand(inner)
    if ci is None or ci[1] != co[1] or inner.args[0] is not ci[0]:
        return None
    return ci[0], co[1], (node, tanh, inner)


def match_eager_attention(node) -> AttentionMatch | None:
    """``matmul(dropout(softmax(matmul(q, k^T) * s [softcap] [+ mask])), v)`` with casts in between."""
    if not P.is_matmul(node) or len(node.args) < 2:
        return None
    probs, v = node.args[0], node.args[1]
    if not isinstance(probs, fx.Node) or not isinstance(v, fx.Node):
        return None
    interior = [node]
    dropout_p = 0.0
    x = probs
    while isinstance(x, fx.Node):
        if P.is_dropout(x) and x.args:
            p = P.call_arg(x, 1, "p", 0.5)
            training = P.call_arg(x, 2, "training", x.kwargs.get("train", True))  # torch.dropout: train=
            if P.const_number(p) is None or not isinstance(training, bool):
                return None
            dropout_p = max(dropout_p, float(p) if training else 0.0)
        elif not P.is_dtype_cast(x):
            break
        interior.append(x)
        x = x.args[0]
    if not P.is_softmax(x):
        return None
    dim = P.call_arg(x, 1, "dim")
    rank = len(P.shape_of(x) or (0,) * 4)
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return None
    interior.append(x)
    s, casts = strip(x.args[0], P.is_dtype_cast)
    interior.extend(casts)

    mask = softcap = scale = None
    for _ in range(8):
        if not isinstance(s, fx.Node) or P.is_matmul(s):
            break
        if P.is_add(s) and mask is None and len(s.args) >= 2 and all(isinstance(t, fx.Node) for t in s.args[:2]):
            a, b = s.args[:2]
            interior.append(s)
            if reaches_matmul(a) and not reaches_matmul(b):
                s, mask = a, b
            elif reaches_matmul(b) and not reaches_matmul(a):
                s, mask = b, a
            else:
                return None
            continue
        sc = _softcap(s) if softcap is None else None
        if sc is not None:
            s, softcap, nodes = sc
            interior.extend(nodes)
            continue
        if P.is_mul(s) and scale is None and _const_operand(s) is not None:
            interior.append(s)
            s, c = _const_operand(s)
            scale = float(c)
            continue
        if P.is_div(s) and scale is None and isinstance(s.args[0], fx.Node) and P.const_number(s.args[1]):
            interior.append(s)
            scale = 1.0 / float(s.args[1])
            s = s.args[0]
            continue
        if P.is_dtype_cast(s):
            interior.append(s)
            s = s.args[0]
            continue
        return None
    if not P.is_matmul(s) or len(s.args) < 2:
        return None
    qk = s
    q, kt = qk.args[0], qk.args[1]
    if not P.is_transpose_last2(kt) or not isinstance(kt.args[0], fx.Node) or not isinstance(q, fx.Node):
        return None
    interior.extend([qk, kt])
    k = kt.args[0]
    if scale is None and P.is_mul(q) and _const_operand(q) is not None:  # q * s before the product
        interior.append(q)
        q, c = _const_operand(q)
        scale = float(c)
    if scale is None:
        scale = 1.0
    kc, vc = unwrap_kv(k), unwrap_kv(v)
    if (kc.groups is None) != (vc.groups is None) or kc.groups != vc.groups:
        return None
    pattern = "eager_repeat_kv" if kc.groups is not None else "eager"
    return _build(pattern, node, q, k, v, kc, vc, mask, scale=scale, is_causal=False, dropout_p=dropout_p,
                  enable_gqa=False, softcap=softcap, nodes=interior)
