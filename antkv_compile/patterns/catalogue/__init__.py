"""The catalogue: every graph shape we recognise, as a named entry with a matcher function.

Entries are tried in order; the first that returns a match wins.  Each entry's function is documented with
the exact graph it recognises (see ``cache_writes`` and ``attention``).  To support a new shape, add a
function there and an ``Entry`` here, plus a test on a graph traced from the model that produces it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch.fx as fx

from ..matches import AttentionMatch, CacheWrite
from . import attention, cache_writes

__all__ = ["Entry", "CACHE_WRITE_ENTRIES", "ATTENTION_ENTRIES", "match_cache_write", "match_attention"]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "cache_write" | "attention"
    match: Callable[[fx.Node], object]

    @property
    def doc(self) -> str:
        return (self.match.__doc__ or "").strip().splitlines()[0]


CACHE_WRITE_ENTRIES = (
    Entry("static_index_copy", "cache_write", cache_writes.match_static_index_copy),
    Entry("input_position_index_copy", "cache_write", cache_writes.match_input_position_index_copy),
    Entry("setitem_write", "cache_write", cache_writes.match_setitem_write),
    Entry("dynamic_cat", "cache_write", cache_writes.match_dynamic_cat),
)

ATTENTION_ENTRIES = (
    Entry("sdpa_gqa", "attention", attention.match_sdpa_gqa),
    Entry("sdpa_repeat_kv", "attention", attention.match_sdpa_repeat_kv),
    Entry("sdpa_mha", "attention", attention.match_sdpa_mha),
    Entry("eager", "attention", attention.match_eager_attention),  # also reports "eager_repeat_kv"
)


def match_cache_write(node: fx.Node) -> CacheWrite | None:
    for entry in CACHE_WRITE_ENTRIES:
        m = entry.match(node)
        if m is not None:
            return m
    return None


def match_attention(node: fx.Node) -> AttentionMatch | None:
    for entry in ATTENTION_ENTRIES:
        m = entry.match(node)
        if m is not None:
            return m
    return None
