"""Catalogue of KV-cache writes, one function per graph shape.  Each takes the candidate write node and
returns a ``CacheWrite`` or None.  Layout assumed everywhere: cache ``[B, H_kv, L, D]``, sequence dim 2.

Shapes (Dynamo graph, torch 2.13 / transformers 5.23 unless said otherwise):

``static_index_copy`` -- transformers 5.x ``StaticLayer.update``::

    cache_position = torch.arange(q_len) + l_..._layers_{i}_cumulative_length     # operator.add
    l_..._layers_{i}_cumulative_length.add_(q_len)                                 # call_method add_
    l_..._layers_{i}_keys.index_copy_(2, cache_position, k_embed)                  # call_method index_copy_
    l_..._layers_{i}_values.index_copy_(2, cache_position, value_states)

  ``add_`` comes *before* the writes in ``StaticLayer`` and *after* them in ``StaticSlidingWindowLayer``.
  When the cache is lazily initialised inside the graph (compiled prefill on an empty cache) the buffers
  are ``torch.zeros`` nodes and the counter is ``cumulative_length.to(device)``.

``input_position_index_copy`` -- transformers 4.5x: the model passes ``cache_position`` in
  ``cache_kwargs``, so the index is a graph input (``l_kwargs_cache_position_``), no in-graph counter::

    l_..._layers_{i}_keys.index_copy_(2, l_cache_position_, k_embed)     # 4.4x: l_..._key_cache_{i}_

``setitem_write`` -- the ``index_copy_`` fallback (MPS, ``NotImplementedError``) and gpt-fast's cache::

    keys[:, :, cache_position] = k_embed        # operator.setitem(keys, (slice(None), slice(None), pos), k)

``dynamic_cat`` -- ``DynamicLayer.update`` (no position; append, shape grows, one graph per length)::

    keys = torch.cat([l_..._layers_{i}_keys, k_embed], dim=-2)
  (first step: ``torch.cat([torch.tensor([]), k_embed], dim=-2)``).  ``DynamicSlidingWindowLayer`` then
  stores ``keys[:, :, -W + 1:, :]`` as the new cache (recorded as ``keep_last = W - 1``).
"""

from __future__ import annotations

import torch.fx as fx

from .. import predicates as P
from ..chains import getitem_seq_slice, strip
from ..matches import CacheWrite
from ..naming import layer_from_module_stack, parse_cache_name

__all__ = [
    "classify_position",
    "match_static_index_copy",
    "match_input_position_index_copy",
    "match_setitem_write",
    "match_dynamic_cat",
]

SEQ_DIM = 2


def _is_cache_tensor(node) -> bool:
    """A cache tensor: a 4-D (or unknown-shape) placeholder -- or module buffer (``get_attr``, in graphs
    from ``fx.symbolic_trace`` / Dynamo without ``inline_inbuilt_nn_modules``) -- or an in-graph allocation
    (a lazily initialised cache)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op in ("placeholder", "get_attr"):
        shape = P.shape_of(node)
        return shape is None or len(shape) == 4
    return P.is_alloc(node)


def _counter_root(node) -> fx.Node | None:
    root, _ = strip(node, P.is_dtype_cast)
    return root if P.is_placeholder(root) else None


def _counter_update(counter: fx.Node) -> fx.Node | None:
    """The ``add_`` that advances ``counter`` (or the placeholder it is a ``.to()`` of)."""
    candidates = [counter]
    root = _counter_root(counter)
    if root is not None and root is not counter:
        candidates.append(root)
    for c in candidates:
        for user in c.users:
            if P.is_inplace_add(user) and user.args and user.args[0] is c:
                return user
    return None


def classify_position(pos) -> tuple | None:
    """Where a write index comes from: ``("cumulative_length", counter, counter_update)`` for
    ``arange(n) + counter`` with ``counter`` a 0-d int graph input (5.x), ``("graph_input", None, None)``
    for a placeholder (4.5x ``cache_position``); None otherwise."""
    if not isinstance(pos, fx.Node):
        return None
    p, _ = strip(pos, P.is_dtype_cast)
    if p.op == "placeholder":
        return ("graph_input", None, None)
    if P.is_add(p) and len(p.args) >= 2:
        a, b = p.args[:2]
        for ar, counter in ((a, b), (b, a)):
            ar_root, _ = strip(ar, P.is_dtype_cast) if isinstance(ar, fx.Node) else (ar, ())
            if not P.is_arange(ar_root) or not isinstance(counter, fx.Node):
                continue
            root = _counter_root(counter)
            if root is None:
                continue
            named = parse_cache_name(root)
            meta = P.tensor_meta(root)
            is_scalar_int = meta is not None and meta.dim() == 0 and not meta.dtype.is_floating_point
            if (named is not None and named.role == "cumulative_length") or is_scalar_int:
                return ("cumulative_length", counter, _counter_update(counter))
    return None


def _layer_and_role(write: fx.Node, buffer: fx.Node, counter: fx.Node | None) -> tuple:
    named = None
    if buffer.op == "placeholder":
        named = parse_cache_name(buffer)
    elif buffer.op == "get_attr":
        named = parse_cache_name(str(buffer.target).replace(".", "_"))
    if named is not None:
        return named.layer, named.role
    if counter is not None:
        root = _counter_root(counter)
        named = parse_cache_name(root) if root is not None else None
        if named is not None:
            return named.layer, None
    return layer_from_module_stack(write), None


def _index_copy_parts(node) -> tuple | None:
    if not P.is_index_copy_(node) or not node.args:
        return None
    buf = node.args[0]
    dim = P.call_arg(node, 1, "dim")
    index = P.call_arg(node, 2, "index")
    new = P.call_arg(node, 3, "source")
    if not _is_cache_tensor(buf) or not isinstance(new, fx.Node) or not isinstance(dim, int):
        return None
    rank = len(P.shape_of(buf) or (0,) * 4)
    if dim % rank != SEQ_DIM:
        return None
    return buf, index, new


def _make(pattern, node, buf, new, pos, kind, counter=None, update=None, keep_last=None) -> CacheWrite:
    layer, role = _layer_and_role(node, buf, counter)
    return CacheWrite(pattern=pattern, node=node, buffer=buf, new=new, position=pos, position_source=kind,
                      seq_dim=SEQ_DIM, layer=layer, role=role, counter=counter, counter_update=update,
                      keep_last=keep_last)


def match_static_index_copy(node) -> CacheWrite | None:
    """``cache.index_copy_(2, arange(q_len) + cumulative_length, new)`` -- transformers 5.x StaticCache."""
    parts = _index_copy_parts(node)
    if parts is None:
        return None
    buf, index, new = parts
    pos = classify_position(index)
    if pos is None or pos[0] != "cumulative_length":
        return None
    return _make("static_index_copy", node, buf, new, index, pos[0], pos[1], pos[2])


def match_input_position_index_copy(node) -> CacheWrite | None:
    """``cache.index_copy_(2, cache_position, new)`` with ``cache_position`` a graph input -- 4.5x StaticCache."""
    parts = _index_copy_parts(node)
    if parts is None:
        return None
    buf, index, new = parts
    pos = classify_position(index)
    if pos is None or pos[0] != "graph_input":
        return None
    return _make("input_position_index_copy", node, buf, new, index, pos[0])


def match_setitem_write(node) -> CacheWrite | None:
    """``cache[:, :, pos] = new`` (``operator.setitem``), pos from ``cumulative_length`` or a graph input."""
    if not P.is_setitem(node) or len(node.args) != 3:
        return None
    buf, idx, new = node.args
    if not _is_cache_tensor(buf) or not isinstance(new, fx.Node) or not isinstance(idx, tuple):
        return None
    if len(idx) < 3 or not (P.is_full_slice(idx[0]) and P.is_full_slice(idx[1])):
        return None
    if not all(P.is_full_slice(i) or i is Ellipsis for i in idx[3:]):
        return None
    index = idx[2]
    pos = classify_position(index)
    if pos is None:
        return None
    return _make("setitem_write", node, buf, new, index, pos[0], pos[1], pos[2])


def _keep_last(cat: fx.Node) -> int | None:
    """``cat[:, :, -n:, :]`` among the users of ``cat`` -> n (what a sliding dynamic layer stores)."""
    best = None
    for user in cat.users:
        s = getitem_seq_slice(user, SEQ_DIM)
        if s is not None and s.stop is None and s.step in (None, 1) and isinstance(s.start, int) and s.start < 0:
            n = -s.start
            best = n if best is None else min(best, n)
    return best


def match_dynamic_cat(node) -> CacheWrite | None:
    """``torch.cat([past, new], dim=-2)`` with ``past`` a cache placeholder or an empty in-graph tensor."""
    if not P.is_cat(node):
        return None
    tensors = P.call_arg(node, 0, "tensors")
    dim = P.call_arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(dim, int):
        return None
    past, new = tensors
    if not isinstance(past, fx.Node) or not isinstance(new, fx.Node):
        return None
    rank = len(P.shape_of(node) or (0,) * 4)
    if rank != 4 or dim % rank != SEQ_DIM:
        return None
    if past.op == "placeholder":
        named = parse_cache_name(past)
        if named is None or named.role not in ("keys", "values"):
            return None
    elif not P.is_alloc(past):
        return None
    return _make("dynamic_cat", node, past, new, None, "append", keep_last=_keep_last(node))
