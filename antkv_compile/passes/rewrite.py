"""The rewrite: (static cache write + attention) sites become one ``antkv_rt.cache_attend`` call.

Two phases, so a graph is either rewritten completely or not touched at all:

1. :func:`plan_rewrite` (no mutation) decides, from a :class:`~antkv_compile.patterns.SiteReport`, which
   sites to rewrite, or why the whole graph must fall back to plain Inductor. Policy:
   * every matched site must be a *static* cache write (fixed capacity, a position) with a known scale and
     layer, and causal (a mask, ``is_causal``, or one query token);
   * ``Unsupported`` items whose reason is ``sliding_window`` (Gemma3/Mistral-style local layers) are
     tolerated: those layers stay exact (their dense cache and attention untouched) and are reported in
     the backend's warning; every other unsupported item (unknown mask, softcap, orphan write, dynamic
     cache ...) makes the whole graph fall back -- never a silent partial rewrite.
2. :func:`apply_rewrite` copies the graph (the caller's ``gm`` is never mutated), inserts the op before
   each attention output, reroutes its users, erases the two cache writes and the now-dead attention
   interior (repeat_kv chain, SDPA / matmul-softmax-matmul), and records what the backend's wrapper must
   bind (cache identity per layer) and release (the dense K/V buffers of rewritten layers).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ..patterns import AttentionSite, Reason, SiteReport
from ..patterns import predicates as P

__all__ = ["RewritePlan", "RewriteResult", "plan_rewrite", "apply_rewrite", "TOLERATED_REASONS"]

TOLERATED_REASONS = frozenset({Reason.SLIDING_WINDOW})


@dataclasses.dataclass
class RewritePlan:
    report: SiteReport
    sites: tuple[AttentionSite, ...] = ()
    kept_exact: tuple = ()  # Unsupported items tolerated (sliding layers), left unchanged
    fallback_reason: str | None = None  # set when the graph must go to Inductor untouched

    @property
    def rewrites(self) -> bool:
        return self.fallback_reason is None and bool(self.sites)


@dataclasses.dataclass
class RewriteResult:
    gm: fx.GraphModule
    plan: RewritePlan
    ops: list  # the inserted op nodes (in the new graph)
    bind: list  # (layer, placeholder index or None): cache identity tensor per layer
    release_inputs: list  # placeholder indices of dense buffers the new graph no longer uses
    release_outputs: list  # flat output indices of in-graph dense buffers (lazily initialised cache)


def _capacity(site: AttentionSite) -> int | fx.Node | None:
    """The cache length: an int, or (a graph traced with dynamic shapes, as Dynamo does after a second prompt
    length) the SymInt graph input that holds it, so the store's capacity is taken at run time."""
    shape = P.shape_of(site.key_buffer)
    if shape is None or len(shape) != 4:
        return None
    length = shape[2]
    if isinstance(length, int):
        return length
    if not isinstance(length, torch.SymInt):
        return None
    expr = length.node.expr
    for node in site.key_buffer.graph.nodes:
        if node.op != "placeholder":
            continue
        value = P.node_value(node)
        if isinstance(value, torch.SymInt) and value.node.expr == expr:
            return node
    return None


def _site_problem(site: AttentionSite) -> str | None:
    a = site.attention
    if site.cache_kind != "static":
        return (f"dynamic_cache: layer {site.layer} appends by torch.cat (DynamicCache); the antkv store "
                "needs a StaticCache (cache_implementation='static')")
    if site.position is None:
        return f"no_position: layer {site.layer} cache write has no position"
    if _capacity(site) is None:
        return f"unknown_capacity: layer {site.layer} cache buffer length is neither static nor a graph input"
    if site.layer is None:
        return "unknown_layer: cannot tell which layer an attention belongs to"
    if a.scale is None:
        return f"unknown_scale: layer {site.layer}"
    if a.mask is None and not a.is_causal and a.q_len != 1:
        return f"non_causal: layer {site.layer} attends without a mask and without is_causal (q_len={a.q_len})"
    if a.dropout_p:
        return f"dropout: layer {site.layer}"
    return None


def plan_rewrite(report: SiteReport) -> RewritePlan:
    kept, blocking = [], []
    for u in report.unsupported:
        (kept if u.reason in TOLERATED_REASONS else blocking).append(u)
    if blocking:
        u = blocking[0]
        more = f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else ""
        return RewritePlan(report, fallback_reason=f"{u.reason}: {u.describe()}{more}")
    sites = list(report.sites)
    if sites and all(s.layer is None for s in sites):
        # hand-written modules (no HF placeholder names, no module stack): number the sites in graph order
        sites = [dataclasses.replace(s, layer=i) for i, s in enumerate(sites)]
    for s in sites:
        problem = _site_problem(s)
        if problem:
            return RewritePlan(report, fallback_reason=problem)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        return RewritePlan(report, fallback_reason=f"duplicate_layer: two attention sites claim layer(s) {layers}")
    if not report.sites:
        reason = "no_attention_site: no (static cache write, attention) pair in this graph"
        if kept:
            reason = f"only_sliding_layers: {len(kept)} sliding-window attention(s) kept exact, nothing to rewrite"
        return RewritePlan(report, kept_exact=tuple(kept), fallback_reason=reason)
    return RewritePlan(report, sites=tuple(sites), kept_exact=tuple(kept))


def _root_placeholder(node: Any) -> fx.Node | None:
    """The placeholder a node aliases through ``.to()`` / ``.to(device)`` (cumulative_length alias)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "placeholder":
            return node
        if node.op == "call_method" and node.target in ("to", "view", "detach") and node.args:
            node = node.args[0]
        else:
            return None
        seen += 1
    return None


_IMPURE_FUNCTIONS = {operator.setitem}


def _removable(n: fx.Node) -> bool:
    if n.users or n.op not in ("call_function", "call_method"):
        return False
    if n.op == "call_method" and (str(n.target).endswith("_") and not str(n.target).endswith("__")):
        return False  # in-place method (add_, index_copy_ ...)
    if n.op == "call_function":
        if n.target in _IMPURE_FUNCTIONS:
            return False
        name = getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return False
    try:
        return not n.is_impure()
    except Exception:  # pragma: no cover - very old fx
        return False


def _dce(graph: fx.Graph, candidates) -> None:
    """Erase dead candidates and, transitively, their dead pure producers."""
    work = list(candidates)
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.graph is not graph or not _removable(n):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        work.extend(inputs)


def apply_rewrite(gm: fx.GraphModule, plan: RewritePlan, session_id: int) -> RewriteResult:
    from . import ops  # noqa: F401  (registers the op)

    graph = fx.Graph()
    vmap: dict = {}
    out = graph.graph_copy(gm.graph, vmap)
    old_output = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(out, type_expr=getattr(old_output, "type", None))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph_index = {n: i for i, n in enumerate(placeholders)}

    op = torch.ops.antkv_rt.cache_attend.default
    inserted, bind, release_in, release_buf = [], [], [], []
    for site in plan.sites:
        a = site.attention
        old_out = vmap[site.output]
        mask = vmap[a.mask.node] if a.mask is not None else None
        capacity = _capacity(site)
        capacity = vmap[capacity] if isinstance(capacity, fx.Node) else int(capacity)
        with graph.inserting_before(old_out):
            node = graph.call_function(op, (vmap[site.query], vmap[site.new_key], vmap[site.new_value],
                                             vmap[site.position], mask, int(session_id), int(site.layer),
                                             capacity, float(a.scale)))
        node.meta = dict(site.output.meta)
        node.meta["antkv_layer"] = site.layer
        old_out.replace_all_uses_with(node)
        inserted.append(node)
        dead = [old_out, *(vmap[n] for n in a.nodes if n in vmap)]
        for w in (site.key_write, site.value_write):
            wn = vmap[w.node]
            buf = vmap[w.buffer]
            if wn.users:
                wn.replace_all_uses_with(buf)
            graph.erase_node(wn)
            dead.append(buf)
        _dce(graph, dead)
        ident = _root_placeholder(site.key_write.counter) if site.key_write.counter is not None else None
        if ident is None and site.key_buffer.op == "placeholder":
            ident = site.key_buffer
        bind.append((site.layer, ph_index.get(ident)))
        for buf in (site.key_buffer, site.value_buffer):
            if buf.op == "placeholder":
                release_in.append(ph_index[buf])
            else:
                release_buf.append(vmap[buf])

    # dense buffers created in the graph (lazily initialised cache) are returned as outputs: find them
    out_node = next(n for n in graph.nodes if n.op == "output")
    flat, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
    release_out = [i for i, x in enumerate(flat) if isinstance(x, fx.Node) and x in set(release_buf)]
    # the new graph must not read or write the released inputs
    new_ph = [n for n in graph.nodes if n.op == "placeholder"]
    for i in release_in:
        users = [u for u in new_ph[i].users]
        if users:
            raise RuntimeError(f"rewrite left {new_ph[i].name} used by {[u.name for u in users]}")
    graph.lint()
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(getattr(gm, "meta", {}))
    return RewriteResult(new_gm, plan, inserted, bind, sorted(set(release_in)), release_out)
