"""Frozen match records returned by the catalogue and by ``find_attention_sites``.

All records hold references to ``fx.Node`` objects of the graph they were matched on; they are snapshots:
mutate the graph and they go stale.  Equality/hash are by identity of the nodes (dataclass ``eq`` compares
fields, and ``fx.Node`` compares by identity), which is what a rewriting pass needs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch.fx as fx

__all__ = [
    "Reason",
    "CacheWrite",
    "MaskInfo",
    "AttentionMatch",
    "AttentionSite",
    "Unsupported",
    "SiteReport",
]


class Reason:
    """Reason codes of ``Unsupported`` (plain strings, stable: ``explain`` and tests key on them)."""

    SLIDING_WINDOW = "sliding_window"  # a window that restricts attention in this graph (or a truncating cache)
    CHUNKED_ATTENTION = "chunked_attention"  # block-local masks (q // chunk == kv // chunk)
    DROPOUT = "dropout"  # attention dropout with p > 0 in training mode
    SOFTCAP = "softcap"  # logit soft-capping: tanh(scores / c) * c
    UNKNOWN_MASK = "unknown_mask"  # mask of a dtype/shape we do not understand
    NON_CACHE_KV = "non_cache_kv"  # K/V are not read from a cache tensor written in this graph
    UNRECOGNISED_CACHE_WRITE = "unrecognised_cache_write"  # the cache tensor is mutated in an unknown way
    AMBIGUOUS_CACHE_WRITE = "ambiguous_cache_write"  # more than one write to the same cache tensor
    READ_BEFORE_WRITE = "read_before_write"  # attention reads the cache before the new token is written
    KV_MISMATCH = "kv_mismatch"  # K and V writes disagree (kind, position, layer) or alias one tensor
    UNKNOWN_ATTENTION_FORM = "unknown_attention_form"  # attention-like ops that no catalogue entry matched
    POST_GRAD_ATTENTION = "post_grad_attention"  # backend-specific ATen SDPA ops (graph is post-AOTAutograd)
    FLEX_ATTENTION = "flex_attention"
    ORPHAN_CACHE_WRITE = "orphan_cache_write"  # a recognised cache write that no attention reads


@dataclasses.dataclass(frozen=True)
class CacheWrite:
    """One write of new key *or* value states into a cache tensor.

    ``pattern`` names the catalogue entry that matched.  For in-place writes (``index_copy_``,
    ``setitem``) the cache content after the write is ``buffer`` itself; for ``torch.cat`` it is ``node``
    (see ``result``).
    """

    pattern: str
    node: fx.Node  # the write: index_copy_ / setitem / cat
    buffer: fx.Node  # the cache tensor: a placeholder, or an in-graph allocation (lazily initialised cache)
    new: fx.Node  # the new states written, [B, H_kv, q_len, D]
    position: fx.Node | None  # index along the sequence dim; None for append-by-cat
    position_source: str  # "cumulative_length" (5.x) | "graph_input" (4.5x) | "append" (cat)
    seq_dim: int  # normalised (non-negative) sequence dimension, 2 for HF caches
    layer: int | None
    role: str | None  # "keys" | "values" from the placeholder name, None when unnamed
    counter: fx.Node | None = None  # cumulative_length (or its .to() alias) the position is computed from
    counter_update: fx.Node | None = None  # the cumulative_length.add_(q_len) node
    keep_last: int | None = None  # DynamicSlidingWindowLayer stores only the last N positions of the cat

    @property
    def is_inplace(self) -> bool:
        return self.position_source != "append"

    @property
    def result(self) -> fx.Node:
        """The node that holds the full cache after this write."""
        return self.buffer if self.is_inplace else self.node

    @property
    def buffer_is_input(self) -> bool:
        return self.buffer.op == "placeholder"


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What we know about an attention mask operand."""

    node: fx.Node  # the mask as consumed by the attention
    source: fx.Node  # the mask before a trailing kv-length slice (``mask[:, :, :, :kv_len]``), else ``node``
    kind: str  # "bool" (SDPA: True = attend) | "additive" (float, added to scores) | "unknown"
    shape: tuple | None
    sliding_window: int | None = None  # window constant found in the mask construction
    chunked: bool = False  # floor-division in the mask construction (chunked / block-local attention)
    problem: str | None = None  # why kind is "unknown" or the shape does not fit


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """One attention computation, as found by an attention catalogue entry (no cache pairing yet)."""

    pattern: str  # catalogue entry name
    node: fx.Node  # the output node: the SDPA call, or the final ``matmul(probs, V)`` of the eager path
    query: fx.Node  # [B, H_q, q_len, D]
    key: fx.Node  # K as consumed (after repeat_kv etc.)
    value: fx.Node
    key_source: fx.Node  # K with repeat_kv / prefix slice / contiguous stripped: cache tensor or cat
    value_source: fx.Node
    mask: MaskInfo | None
    scale: float | None  # effective softmax scale (SDPA default 1/sqrt(D) filled in); None if unknown
    is_causal: bool
    dropout_p: float  # effective dropout probability (0.0 for eval-mode dropout nodes)
    enable_gqa: bool
    gqa_groups: int | None  # H_q // H_kv (1 for MHA); None if shapes are unknown
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    q_len: int | None
    kv_len: int | None  # length of the key sequence the attention reads (after kv_limit)
    kv_limit: int | None = None  # K/V read as ``source[:, :, :kv_limit]``
    softcap: float | None = None
    nodes: tuple = ()  # the pattern's interior nodes, query side excluded (for replacement / DCE)

    @property
    def output(self) -> fx.Node:
        return self.node

    @property
    def sliding_window(self) -> int | None:
        return self.mask.sliding_window if self.mask is not None else None


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An attention paired with the cache writes of the K and V it reads: the unit we rewrite."""

    layer: int | None
    attention: AttentionMatch
    key_write: CacheWrite
    value_write: CacheWrite
    sliding_window: int | None = None  # recorded when present but inactive (window > cache length)

    # conveniences (the fields the rewriting pass needs) ----------------------------------------------
    @property
    def query(self) -> fx.Node:
        return self.attention.query

    @property
    def key_buffer(self) -> fx.Node:
        return self.key_write.buffer

    @property
    def value_buffer(self) -> fx.Node:
        return self.value_write.buffer

    @property
    def new_key(self) -> fx.Node:
        return self.key_write.new

    @property
    def new_value(self) -> fx.Node:
        return self.value_write.new

    @property
    def position(self) -> fx.Node | None:
        return self.key_write.position

    @property
    def scale(self) -> float | None:
        return self.attention.scale

    @property
    def mask(self) -> fx.Node | None:
        return self.attention.mask.node if self.attention.mask is not None else None

    @property
    def is_causal(self) -> bool:
        return self.attention.is_causal

    @property
    def gqa_groups(self) -> int | None:
        return self.attention.gqa_groups

    @property
    def output(self) -> fx.Node:
        return self.attention.node

    @property
    def cache_kind(self) -> str:
        """"static" (in-place writes into fixed buffers) or "dynamic" (append by cat)."""
        return "static" if self.key_write.is_inplace else "dynamic"

    def describe(self) -> str:
        a, w = self.attention, self.key_write
        parts = [
            f"layer {self.layer if self.layer is not None else '?'}: {a.pattern} <- {w.pattern}",
            f"q={a.query.name}",
            f"k_cache={self.key_buffer.name}",
            f"v_cache={self.value_buffer.name}",
            f"new_k={self.new_key.name}",
            f"new_v={self.new_value.name}",
            f"pos={self.position.name if self.position is not None else '-'}({w.position_source})",
            f"mask={a.mask.node.name + ':' + a.mask.kind if a.mask else None}",
            f"causal={a.is_causal}",
            f"scale={a.scale:.6g}" if a.scale is not None else "scale=?",
            f"gqa={a.gqa_groups}",
            f"out={a.node.name}",
        ]
        if a.kv_limit is not None:
            parts.append(f"kv_limit={a.kv_limit}")
        if self.sliding_window is not None:
            parts.append(f"window={self.sliding_window}(inactive)")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """An attention-like node (or cache write) we found but will not rewrite, and why."""

    node: fx.Node
    reason: str  # one of ``Reason``
    detail: str = ""
    layer: int | None = None

    def describe(self) -> str:
        layer = f"layer {self.layer}" if self.layer is not None else "layer ?"
        text = f"{layer}: {self.node.name} [{self.reason}]"
        return f"{text} {self.detail}" if self.detail else text


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """Everything ``find_attention_sites`` found in one graph: matched sites and unsupported items."""

    sites: tuple[AttentionSite, ...] = ()
    unsupported: tuple[Unsupported, ...] = ()
    graph_name: str = "graph"

    def __iter__(self) -> Iterator[AttentionSite]:
        return iter(self.sites)

    @property
    def fully_matched(self) -> bool:
        """True when every attention-like node in the graph was matched (vacuously true for none)."""
        return not self.unsupported

    @property
    def layers(self) -> tuple:
        return tuple(s.layer for s in self.sites)

    def by_layer(self) -> dict:
        return {s.layer: s for s in self.sites}

    def reasons(self) -> dict:
        """``{reason: count}`` over ``unsupported``."""
        out: dict = {}
        for u in self.unsupported:
            out[u.reason] = out.get(u.reason, 0) + 1
        return out

    def summary(self) -> str:
        head = f"{self.graph_name}: {len(self.sites)} attention site(s) matched, {len(self.unsupported)} unsupported"
        lines = [head]
        lines += ["  + " + s.describe() for s in self.sites]
        lines += ["  - " + u.describe() for u in self.unsupported]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
