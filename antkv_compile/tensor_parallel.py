"""Tensor parallelism: which KV heads a rank's Dynamo graph holds, and the codebook slice that fits them.

What the graphs look like (observed with torch 2.13 CPU, transformers 5.25, gloo, world size 2, a 4-layer
tiny Llama loaded with ``from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))`` under
``torchrun``; ``patterns/OBSERVED.md``, "Tensor parallel"): transformers' own plan (``base_model_tp_plan``:
q/k/v/gate/up colwise, o/down rowwise, lm_head colwise with gathered output) runs on CPU with gloo as it does
on GPUs with NCCL, so nothing here re-implements it. Dynamo captures the whole forward as one graph without a
break. Weights are ``DTensor`` placeholders; in inference (``torch.no_grad``) each projection is
``linear(x, W.to_local())`` on local tensors, so the attention of a rank is the ordinary pattern on *local*
head counts (2 query / 1 KV head of 4 / 2 here), the static-cache writes go into the rank's local cache
buffers (``StaticCache`` sizes them from the first key states: ``[B, 1, L, D]``), and the only collectives
are ``_c10d_functional.all_reduce`` after o_proj / down_proj and the DTensor gather of the logits. The
pattern catalogue and the rewrite therefore run per rank unchanged; each rank's store holds its KV heads only.

What the graph does not show is *which* global KV heads a rank holds, and the codebooks are per layer and
KV head. :func:`kv_shard` reads it from the sharding of the K/V projection weights that feed each cache
write (the ``DTensor`` graph inputs: mesh, ``Shard(0)`` placement, the rank's coordinate), and
:meth:`~antkv_compile.artifact.CodebookArtifact.for_kv_heads` slices the artifact to those heads. A layout we
cannot read (a head split between ranks, placements other than ``Shard(0)``, K and V or layers sharded
differently, attention on DTensors) is reported as a problem and the backend compiles the graph unchanged
with one warning: it never codes a head with another head's codebook.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["KVShard", "kv_shard", "is_dtensor", "linear_weights"]

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_PASS_METHODS = {"to_local", "to", "detach", "contiguous", "t"}


def is_dtensor(x: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


@dataclasses.dataclass(frozen=True)
class KVShard:
    """The global heads one rank holds (the same for every rewritten layer)."""

    start: int  # first global KV head of this rank
    count: int  # KV heads on this rank
    total: int  # KV heads of the whole model
    q_start: int
    q_count: int
    q_total: int
    world: int  # ranks the heads are split over (size of the mesh dimension)
    rank: int  # this rank's coordinate on that mesh dimension

    def describe(self) -> str:
        return (f"KV heads {self.start}..{self.start + self.count - 1} of {self.total} (query heads {self.q_start}.."
                f"{self.q_start + self.q_count - 1} of {self.q_total}) on rank {self.rank} of {self.world}")


def _is_linear(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _LINEAR


def linear_weights(node: fx.Node, depth: int = 24) -> list[fx.Node]:
    """The weight operands of the nearest ``linear`` calls that ``node`` is computed from (a K/V/Q projection
    behind its view / transpose / RoPE), searching backwards without passing through a linear."""
    seen, frontier, found = {node}, [node], []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if _is_linear(n):
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                if isinstance(w, fx.Node) and w not in found:
                    found.append(w)
                continue
            for i in n.all_input_nodes:
                if i not in seen:
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return found


def _root(w: fx.Node) -> fx.Node | None:
    """The placeholder behind a weight operand (``W.to_local()``, ``W.to(dtype)``), or None."""
    for _ in range(8):
        if w.op == "placeholder":
            return w
        if w.op == "call_method" and w.target in _PASS_METHODS and w.args and isinstance(w.args[0], fx.Node):
            w = w.args[0]
        elif w.op == "call_function" and w.target is operator.getitem:
            return None
        else:
            return None
    return None


def _head_range(weight, head_dim: int, what: str) -> tuple[tuple[int, int, int, int, int] | None, str | None]:
    """((start, count, total, world, rank), None) of the heads a sharded projection weight gives this rank,
    (None, None) for an unsharded weight, or (None, problem)."""
    if not is_dtensor(weight):
        return None, None
    from torch.distributed.tensor import Replicate, Shard

    placements, mesh = tuple(weight.placements), weight.device_mesh
    shards = [(i, p) for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if not shards:
        return None, None  # replicated: every rank holds every head
    if len(shards) != 1 or type(shards[0][1]) is not Shard or shards[0][1].dim not in (0, -weight.dim()):
        return None, f"{what} weight placements {placements}: only Shard(0) over one mesh dimension is understood"
    mesh_dim = shards[0][0]
    rows = int(weight.shape[0])
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
        local_rows, first = int(local_shape[0]), int(offset[0])
    except Exception:  # private helper moved: even split, DTensor's rule for Shard(0)
        world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        per = -(-rows // world)
        first, local_rows = min(rank * per, rows), max(0, min(per, rows - rank * per))
    if rows % head_dim or local_rows % head_dim or first % head_dim or local_rows == 0:
        return None, (f"{what} weight of {rows} rows sharded as rows {first}..{first + local_rows - 1} on this rank: "
                      f"not whole heads of head_dim {head_dim} (fewer heads than ranks?)")
    return (first // head_dim, local_rows // head_dim, rows // head_dim, mesh.size(mesh_dim),
            mesh.get_local_rank(mesh_dim)), None


def _projection(node: fx.Node, placeholders: dict, example_inputs, head_dim: int, what: str):
    ws = linear_weights(node)
    if len(ws) != 1:
        return None, None if not ws else f"{what} comes from {len(ws)} projections"
    root = _root(ws[0])
    if root is None or root not in placeholders:
        return None, None
    idx = placeholders[root]
    value = example_inputs[idx] if idx < len(example_inputs) else None
    return _head_range(value, head_dim, what)


def kv_shard(gm: fx.GraphModule, example_inputs, sites) -> tuple[KVShard | None, str | None]:
    """``(shard, None)``: the heads this rank holds when the graph's K/V projections are sharded DTensors;
    ``(None, None)``: not sharded (every rank, or the only process, holds every head); ``(None, problem)``: a
    sharded layout this package does not understand (the backend then compiles the graph unchanged)."""
    from .patterns import predicates as P

    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found = set()
    for s in sites:
        for node, what in ((s.query, "query"), (s.new_key, "key"), (s.new_value, "value")):
            if is_dtensor(P.tensor_meta(node)):
                return None, (f"layer {s.layer} attends on DTensors ({what} {node.name}); the store needs each rank's "
                              "local heads (transformers' colwise plans return local tensors)")
        shape = P.shape_of(s.new_key)
        if not shape or not isinstance(shape[-1], int):
            continue
        d = shape[-1]
        got = {}
        for node, what in ((s.query, "query"), (s.new_key, "key"), (s.new_value, "value")):
            r, problem = _projection(node, placeholders, example_inputs, d, f"layer {s.layer} {what} projection")
            if problem:
                return None, problem
            got[what] = r
        if got["key"] is None and got["value"] is None:
            continue
        if got["key"] != got["value"]:
            return None, f"layer {s.layer}: K heads {got['key']} and V heads {got['value']} are sharded differently"
        kv, q = got["key"], got["query"]
        if q is None:
            return None, f"layer {s.layer}: K/V projections are sharded but the query projection is not"
        k_start, k_count, k_total, world, rank = kv
        q_start, q_count, q_total = q[:3]
        if q_total % k_total or q_count * k_total != k_count * q_total or q_start * k_total != k_start * q_total:
            return None, (f"layer {s.layer}: query heads {q_start}..{q_start + q_count - 1} of {q_total} are not the "
                          f"groups of KV heads {k_start}..{k_start + k_count - 1} of {k_total}")
        found.add(KVShard(k_start, k_count, k_total, q_start, q_count, q_total, world, rank))
    if not found:
        return None, None
    if len(found) > 1:
        return None, "layers are sharded differently: " + "; ".join(s.describe() for s in sorted(found, key=str))
    return found.pop(), None
