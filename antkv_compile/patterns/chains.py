"""Walking back through the small op chains that sit between a cache tensor and the attention op.

Between a cache tensor ``C`` ([B, H_kv, L, D]) and the K/V operand of attention, HF inserts:

* ``repeat_kv`` (GQA without ``enable_gqa``)::

      getitem(C, (:, :, None, :, :))          # or C.unsqueeze(2)
      -> expand(B, H_kv, n_rep, L, D)
      [-> contiguous() / clone()]              # seen in other versions / post-grad graphs
      -> reshape(B, H_kv * n_rep, L, D)        # or view
  (or ``torch.repeat_interleave(C, n_rep, dim=1)`` in some models);
* a prefix slice, in SDPA prefill on an empty static cache: ``C[:, :, :q_len, :]``;
* layout no-ops: ``contiguous()`` / ``clone()``.

``unwrap_kv`` peels any of these, in any order, and reports what it removed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from . import predicates as P

__all__ = ["KVChain", "unwrap_kv", "unwrap_repeat_kv", "prefix_slice_limit", "strip"]


@dataclasses.dataclass(frozen=True)
class KVChain:
    source: fx.Node  # what remains after peeling
    groups: int | None  # n_rep of a repeat_kv chain (None: no chain)
    limit: int | None  # stop of a prefix slice along the sequence dim (None: no slice)
    nodes: tuple  # peeled nodes, outermost first


def strip(node, *predicates) -> tuple:
    """Follow ``args[0]`` while the node satisfies any predicate; returns (innermost node, peeled nodes)."""
    peeled = []
    while isinstance(node, fx.Node) and node.args and any(p(node) for p in predicates) \
            and isinstance(node.args[0], fx.Node):
        peeled.append(node)
        node = node.args[0]
    return node, tuple(peeled)


def _is_unsqueeze_dim2(node) -> bool:
    """``x[:, :, None, :, :]`` / ``x[:, :, None]`` / ``x.unsqueeze(2)`` on a 4-D tensor."""
    if P.is_unsqueeze(node):
        dim = P.call_arg(node, 1, "dim")
        return dim in (2, -3)
    if P.is_getitem(node) and len(node.args) == 2 and isinstance(node.args[1], tuple):
        idx = node.args[1]
        return (
            len(idx) >= 3
            and P.is_full_slice(idx[0])
            and P.is_full_slice(idx[1])
            and idx[2] is None
            and all(P.is_full_slice(i) or i is Ellipsis for i in idx[3:])
        )
    return False


def unwrap_repeat_kv(node) -> tuple | None:
    """If ``node`` is the output of a ``repeat_kv`` chain, return ``(input, n_rep, chain_nodes)``."""
    if not isinstance(node, fx.Node):
        return None
    if P.is_op(node, {torch.repeat_interleave}, ("repeat_interleave",)):
        reps = P.call_arg(node, 1, "repeats")
        dim = P.call_arg(node, 2, "dim")
        if isinstance(reps, int) and dim == 1 and isinstance(node.args[0], fx.Node):
            return node.args[0], reps, (node,)
        return None
    if not P.is_reshape(node) or not isinstance(node.args[0], fx.Node):
        return None
    inner, noops = strip(node.args[0], P.is_layout_noop)
    if not P.is_expand(inner) or not isinstance(inner.args[0], fx.Node):
        return None
    unsq = inner.args[0]
    if not _is_unsqueeze_dim2(unsq) or not isinstance(unsq.args[0], fx.Node):
        return None
    n_rep = None
    sizes = inner.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) == 5 and isinstance(sizes[2], int):
        n_rep = sizes[2]
    else:
        shp = P.shape_of(inner)
        if shp is not None and len(shp) == 5 and isinstance(shp[2], int):
            n_rep = shp[2]
    if n_rep is None:
        return None
    return unsq.args[0], n_rep, (node, *noops, inner, unsq)


def prefix_slice_limit(node) -> int | fx.Node | None:
    """``x[:, :, :n]`` / ``x[:, :, :n, :]`` / ``x[:, :, 0:n, ...]`` on a 4-D tensor -> ``n`` (an int, or the graph
    node of a symbolic length when Dynamo traced dynamic shapes); else None."""
    if not P.is_getitem(node) or len(node.args) != 2 or not isinstance(node.args[1], tuple):
        return None
    idx = node.args[1]
    if len(idx) < 3 or not (P.is_full_slice(idx[0]) and P.is_full_slice(idx[1])):
        return None
    s = idx[2]
    if not isinstance(s, slice) or s.start not in (None, 0) or s.step not in (None, 1):
        return None
    if isinstance(s.stop, fx.Node):
        if not isinstance(P.node_value(s.stop), torch.SymInt):
            return None
    elif not isinstance(s.stop, int) or isinstance(s.stop, bool) or s.stop < 0:
        return None
    if not all(P.is_full_slice(i) or i is Ellipsis for i in idx[3:]):
        return None
    return s.stop


def unwrap_kv(node) -> KVChain:
    """Peel repeat_kv / prefix slices / contiguous / clone from a K or V operand."""
    groups = None
    limit = None
    peeled: list = []
    while isinstance(node, fx.Node):
        if P.is_layout_noop(node) and isinstance(node.args[0], fx.Node):
            peeled.append(node)
            node = node.args[0]
            continue
        rep = unwrap_repeat_kv(node)
        if rep is not None:
            node, n, chain = rep
            groups = n if groups is None else groups * n
            peeled.extend(chain)
            continue
        lim = prefix_slice_limit(node)
        if lim is not None and isinstance(node.args[0], fx.Node):
            if limit is None or isinstance(lim, fx.Node):
                limit = lim
            elif isinstance(limit, int):
                limit = min(limit, lim)
            peeled.append(node)
            node = node.args[0]
            continue
        break
    return KVChain(source=node, groups=groups, limit=limit, nodes=tuple(peeled))


def getitem_seq_slice(node: fx.Node, seq_dim: int = 2) -> slice | None:
    """The slice applied along ``seq_dim`` by ``node = x[...]`` when every other index is ``:``."""
    if not P.is_getitem(node) or len(node.args) != 2:
        return None
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    if Ellipsis in idx:
        return None
    if len(idx) <= seq_dim:
        return None
    if not all(P.is_full_slice(i) for k, i in enumerate(idx) if k != seq_dim):
        return None
    s = idx[seq_dim]
    return s if isinstance(s, slice) else None

