"""What the backend can tell about the model from a Dynamo graph, to check a codebook artifact against it
before compiling (the backend sees the graph, not the model object).

* geometry: query / KV heads and head_dim from the rewritten sites' shapes, layer indices from the names of
  the lifted parameters (``..._layers_modules_{i}_...``);
* family: the model class in the nodes' ``nn_module_stack`` (``LlamaModel`` -> ``llama``);
* RoPE: the rotary embedding's ``inv_freq`` buffer (a graph input);
* weights: the lifted parameters themselves (real tensors), compared with the artifact's *weight fingerprint*
  (shape and norm of every parameter, written at calibration by :func:`weight_fingerprint`). That is how a
  model is recognised without its name: two models of one architecture and size differ in their weights.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor

__all__ = ["GraphFacts", "facts_from_graph", "family", "weight_fingerprint", "fingerprint_matches"]

_LAYER = re.compile(r"layers_(?:modules_)?(\d+)_")
_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "TextModel", "Model")


@dataclasses.dataclass
class GraphFacts:
    family: str | None
    layers: tuple[int, ...]  # layer indices whose parameters are inputs of this graph
    num_q_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    inv_freq: Tensor | None
    params: list[Tensor]


def family(class_name: str | None) -> str | None:
    """``LlamaForCausalLM`` / ``LlamaModel`` -> ``llama``."""
    if not class_name:
        return None
    for s in _SUFFIXES:
        if class_name.endswith(s) and len(class_name) > len(s):
            return class_name[: -len(s)].lower()
    return class_name.lower()


def _module_family(gm) -> str | None:
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            _, cls = next(iter(stack.values()))
            name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            return family(name.rsplit(".", 1)[-1].strip("'>"))
    return None


def facts_from_graph(gm, example_inputs, sites, shard=None) -> GraphFacts:
    """``shard`` (:class:`~antkv_compile.tensor_parallel.KVShard`, a tensor-parallel rank): the facts are the
    whole model's (global head counts), and the weight fingerprint compares the parameters every rank holds
    whole (replicated ones; a sharded parameter's norm would need a collective)."""
    from .patterns import predicates as P
    from .tensor_parallel import is_dtensor

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params, layers, inv_freq, seen = [], set(), None, set()
    for n, x in zip(phs, example_inputs):
        if isinstance(x, torch.nn.Parameter):
            m = _LAYER.search(n.name)
            if m:
                layers.add(int(m.group(1)))
            if id(x) not in seen:
                seen.add(id(x))
                if is_dtensor(x):
                    from torch.distributed.tensor import Replicate

                    if not all(isinstance(p, Replicate) for p in x.placements):
                        continue
                    x = x.to_local()
                params.append(x)
        elif isinstance(x, Tensor) and n.name.rstrip("_").endswith("inv_freq") and x.dim() == 1:
            inv_freq = x
    hq = hkv = d = None
    for s in sites:
        q, kb = P.shape_of(s.query), P.shape_of(s.key_buffer)
        if q and len(q) == 4 and isinstance(q[1], int):
            hq = q[1]
        if kb and len(kb) == 4 and isinstance(kb[1], int) and isinstance(kb[3], int):
            hkv, d = kb[1], kb[3]
    if shard is not None:
        hq, hkv = shard.q_total, shard.total
    return GraphFacts(_module_family(gm), tuple(sorted(layers)), hq, hkv, d, inv_freq, params)


@torch.no_grad()
def weight_fingerprint(tensors) -> list[list]:
    """[[shape..., norm], ...] of each distinct tensor (tied weights once), norms to 6 significant digits."""
    out, seen = [], set()
    for t in tensors:
        if id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        out.append([*t.shape, float(f"{float(t.detach().double().norm()):.6g}")])
    return out


def fingerprint_matches(fingerprint: list[list], params: list[Tensor], rtol: float = 1e-3) -> tuple[int, int]:
    """(matched, total): how many of ``params`` have a fingerprint entry of the same shape and norm."""
    by_shape: dict[tuple, list[float]] = {}
    for entry in fingerprint:
        by_shape.setdefault(tuple(entry[:-1]), []).append(entry[-1])
    matched = total = 0
    for _shape_norm in weight_fingerprint(params):
        shape, norm = tuple(_shape_norm[:-1]), _shape_norm[-1]
        total += 1
        if any(abs(norm - c) <= rtol * max(abs(c), 1e-12) for c in by_shape.get(shape, ())):
            matched += 1
    return matched, total
