"""``find_attention_sites``: pair every attention with the cache writes of the K/V it reads.

The unit a KV-cache rewrite needs is (new K/V -> cache write -> attention reading that cache).  This module
runs the catalogue over a Dynamo graph, pairs attention matches with cache writes through the tensor the
attention reads (the cache buffer for in-place writes, the ``cat`` output for dynamic caches), applies the
support policy, and reports everything attention-like that it did not pair -- never a silent partial match.

Support policy (an ``Unsupported`` is reported for the first failing rule, the others go to ``detail``):

* chunked masks; a sliding window that restricts attention in this graph, or a dynamic cache that
  truncates to a window (windows longer than a static cache buffer are inactive and only recorded);
  logit soft-capping; dropout with p > 0; a mask whose dtype/shape does not fit; ``is_causal`` with
  q_len != kv_len (SDPA aligns it top-left);
* K and V must each be read from a cache tensor with exactly one recognised write, written before the
  attention reads it, with no other in-place mutation; K and V writes must agree (pattern, position,
  layer) and be distinct tensors.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from . import predicates as P
from .catalogue import match_attention, match_cache_write
from .catalogue.attention import reaches_matmul
from .matches import AttentionMatch, AttentionSite, CacheWrite, Reason, SiteReport, Unsupported
from .naming import layer_from_module_stack

__all__ = ["find_attention_sites", "find_cache_writes", "find_attention_matches"]

log = logging.getLogger("antkv_compile.patterns")


def _graph(gm_or_graph) -> fx.Graph:
    return gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph


def find_cache_writes(gm_or_graph) -> list[CacheWrite]:
    """Every node a cache-write catalogue entry recognises, in graph order."""
    return [w for w in map(match_cache_write, _graph(gm_or_graph).nodes) if w is not None]


def find_attention_matches(gm_or_graph) -> list[AttentionMatch]:
    """Every node an attention catalogue entry recognises, in graph order (no pairing, no policy)."""
    return [m for m in map(match_attention, _graph(gm_or_graph).nodes) if m is not None]


def _seq_len(node) -> int | None:
    shape = P.shape_of(node)
    if shape is None or len(shape) != 4 or not isinstance(shape[2], int):
        return None
    return shape[2]


def _tensor_key(node: fx.Node):
    """Identity of the tensor a node stands for: ``fx.symbolic_trace`` emits one ``get_attr`` node per
    attribute access, so module buffers are identified by their target."""
    return ("get_attr", node.target) if node.op == "get_attr" else node


def _resolve(source: fx.Node, m: AttentionMatch, by_result: dict, aliases: dict, order: dict) -> tuple:
    """The cache write feeding ``source`` (the K or V tensor an attention reads): ``(write, None, "")`` or
    ``(write_or_None, reason, detail)``."""
    key = _tensor_key(source)
    writes = by_result.get(key, [])
    nodes = aliases.get(key, [source])
    mutations = [u for n in nodes for u in n.users if P.is_inplace_mutation(u, n)]
    if not writes:
        if mutations:
            u = mutations[0]
            return None, Reason.UNRECOGNISED_CACHE_WRITE, f"{source.name} mutated by {u.name} ({u.target})"
        what = source.target if source.op != "placeholder" else "graph input"
        return None, Reason.NON_CACHE_KV, f"reads {source.name} ({what}), not a cache written in this graph"
    w = writes[0]
    if len(writes) > 1:
        return w, Reason.AMBIGUOUS_CACHE_WRITE, f"{source.name} written by {', '.join(x.node.name for x in writes)}"
    if w.is_inplace:
        extra = [u for u in mutations if u is not w.node]
        if extra:
            return w, Reason.UNRECOGNISED_CACHE_WRITE, f"{source.name} also mutated by {extra[0].name} ({extra[0].target})"
        interior = set(m.nodes) | {m.node}
        readers = [u for n in nodes for u in n.users if u in interior]
        late = [r for r in readers if order[r] < order[w.node]]
        if late:
            return w, Reason.READ_BEFORE_WRITE, f"{late[0].name} reads {source.name} before {w.node.name} writes it"
    return w, None, ""


def _kv_mismatch(kw: CacheWrite, vw: CacheWrite) -> str | None:
    if _tensor_key(kw.buffer) == _tensor_key(vw.buffer) or kw.node is vw.node:
        return "K and V read the same cache tensor"
    if kw.pattern != vw.pattern:
        return f"K written by {kw.pattern}, V by {vw.pattern}"
    if kw.is_inplace and kw.position is not vw.position:
        return f"K and V written at different positions ({kw.position}, {vw.position})"
    if kw.layer is not None and vw.layer is not None and kw.layer != vw.layer:
        return f"K cache of layer {kw.layer}, V cache of layer {vw.layer}"
    if kw.role not in (None, "keys") or vw.role not in (None, "values"):
        return f"K reads a '{kw.role}' cache tensor, V a '{vw.role}' one"
    return None


def _policy(m: AttentionMatch, kw, vw) -> tuple:
    """(reasons [(reason, detail)], inactive window or None)."""
    reasons = []
    inactive = None
    if m.mask is not None and m.mask.chunked:
        reasons.append((Reason.CHUNKED_ATTENTION, "floor division in the mask construction"))
    window = m.sliding_window
    source = "mask"
    if window is None and kw is not None and kw.keep_last is not None:
        window, source = kw.keep_last + 1, "cache keeps the last %d positions" % kw.keep_last
    if window is not None:
        if kw is not None and kw.is_inplace:
            length = _seq_len(kw.buffer)
        elif kw is None:
            length = m.kv_len
        else:
            length = None  # a dynamic cache grows past any window
        if isinstance(length, int) and window > length:
            inactive = window
        else:
            reasons.append((Reason.SLIDING_WINDOW, f"window {window} ({source}), kv length {length}"))
    if m.softcap is not None:
        reasons.append((Reason.SOFTCAP, f"tanh soft-capping at {m.softcap}"))
    if m.dropout_p > 0:
        reasons.append((Reason.DROPOUT, f"dropout p={m.dropout_p}"))
    if m.mask is not None and (m.mask.kind == "unknown" or m.mask.problem):
        reasons.append((Reason.UNKNOWN_MASK, m.mask.problem or "unknown mask"))
    if m.is_causal and m.q_len is not None and m.kv_len is not None and m.q_len != m.kv_len:
        reasons.append((Reason.UNKNOWN_MASK, f"is_causal with q_len {m.q_len} != kv_len {m.kv_len}"))
    return reasons, inactive


def _looks_like_attention_softmax(node: fx.Node) -> bool:
    """A softmax over matmul scores whose result feeds a matmul (within a few casts / dropout)."""
    if not P.is_softmax(node) or not node.args or not reaches_matmul(node.args[0]):
        return False
    frontier, depth = [node], 0
    while frontier and depth < 4:
        nxt = []
        for n in frontier:
            for u in n.users:
                if P.is_matmul(u):
                    return True
                if P.is_dtype_cast(u) or P.is_dropout(u) or P.is_layout_noop(u):
                    nxt.append(u)
        frontier, depth = nxt, depth + 1
    return False


def find_attention_sites(gm_or_graph, *, name: str | None = None) -> SiteReport:
    """Find every attention in ``gm_or_graph`` (a Dynamo ``GraphModule`` or ``fx.Graph``) and the cache
    writes feeding it.  Returns a ``SiteReport`` of matched ``AttentionSite``s and ``Unsupported`` items."""
    graph = _graph(gm_or_graph)
    if name is None:
        name = type(gm_or_graph).__name__ if isinstance(gm_or_graph, fx.GraphModule) else "graph"
    order = {n: i for i, n in enumerate(graph.nodes)}

    writes = find_cache_writes(graph)
    by_result: dict = {}
    for w in writes:
        by_result.setdefault(_tensor_key(w.result), []).append(w)
    aliases: dict = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            aliases.setdefault(_tensor_key(n), []).append(n)
    matches = find_attention_matches(graph)

    sites, unsupported, claimed_writes, claimed_nodes = [], [], set(), set()
    for m in matches:
        claimed_nodes.update(m.nodes)
        claimed_nodes.add(m.node)
        kw, kerr, kdet = _resolve(m.key_source, m, by_result, aliases, order)
        vw, verr, vdet = _resolve(m.value_source, m, by_result, aliases, order)
        for w in (kw, vw):
            if w is not None:
                claimed_writes.add(w.node)
        reasons, inactive = _policy(m, kw, vw)
        if kerr:
            reasons.append((kerr, "K " + kdet))
        if verr:
            reasons.append((verr, "V " + vdet))
        if kw is not None and vw is not None and not kerr and not verr:
            mismatch = _kv_mismatch(kw, vw)
            if mismatch:
                reasons.append((Reason.KV_MISMATCH, mismatch))
        layer = next((w.layer for w in (kw, vw) if w is not None and w.layer is not None), None)
        if layer is None:
            layer = layer_from_module_stack(m.node)
        if reasons:
            detail = "; ".join(f"{r}: {d}" if i else d for i, (r, d) in enumerate(reasons))
            u = Unsupported(node=m.node, reason=reasons[0][0], detail=f"({m.pattern}) {detail}", layer=layer)
            unsupported.append(u)
            log.debug("unsupported attention %s", u.describe())
        else:
            site = AttentionSite(layer=layer, attention=m, key_write=kw, value_write=vw, sliding_window=inactive)
            sites.append(site)
            log.debug("attention site %s", site.describe())

    for n in graph.nodes:
        if n in claimed_nodes:
            continue
        reason = None
        if P.is_sdpa(n):
            reason, detail = Reason.UNKNOWN_ATTENTION_FORM, "SDPA whose K/V shapes match no catalogue entry"
        elif P.is_sdpa_like(n):
            reason, detail = Reason.POST_GRAD_ATTENTION, f"{n.target}: match before AOTAutograd"
        elif P.is_flex_attention(n):
            reason, detail = Reason.FLEX_ATTENTION, str(n.target)
        elif _looks_like_attention_softmax(n):
            reason, detail = Reason.UNKNOWN_ATTENTION_FORM, "softmax between matmuls that no eager entry matched"
        if reason is not None:
            u = Unsupported(node=n, reason=reason, detail=detail, layer=layer_from_module_stack(n))
            unsupported.append(u)
            log.debug("unsupported attention %s", u.describe())

    for w in writes:
        if w.node not in claimed_writes:
            u = Unsupported(node=w.node, reason=Reason.ORPHAN_CACHE_WRITE,
                            detail=f"{w.pattern} into {w.buffer.name}; no matched attention reads it", layer=w.layer)
            unsupported.append(u)
            log.debug("orphan cache write %s", u.describe())

    unsupported.sort(key=lambda u: order.get(u.node, -1))
    report = SiteReport(sites=tuple(sites), unsupported=tuple(unsupported), graph_name=name)
    log.debug("%s", report.summary())
    return report
