"""Does this call fit the static cache? Checked before any kernel runs.

A graph that is *not* rewritten (the backend falls back to plain Inductor) keeps the dense cache writes
``cache.index_copy_(2, positions, new)``. When the new tokens do not fit (a 32-token prompt into
``StaticCache(max_cache_len=16)``, or a step past the end of the cache), Inductor's kernel indexes out of
bounds and aborts the whole process. This module finds those writes and says, as a Python exception, which
lengths do not fit and what to change:

* :func:`oversized_write` -- at compile time: a write of more new tokens than the cache holds can never run;
* :func:`position_guard` -- at run time, before the compiled graph: ``cumulative_length + new > capacity``.

Rewritten graphs do not write the dense cache; their store checks its own capacity (which may be larger than
the dense cache, ``options={'capacity': N}``).
"""
from __future__ import annotations

import torch

from .numerics.store import CacheInputError

__all__ = ["CacheCapacityError", "guarded", "oversized_write", "position_guard", "raising"]

FIX = ("allocate a larger cache (StaticCache(max_cache_len=...) >= prompt + new tokens; generate(..., "
       "cache_implementation='static') sizes it from max_new_tokens) or shorten the prompt")


class CacheCapacityError(CacheInputError):
    """The new tokens of a call do not fit the static cache."""


def _static_writes(gm):
    """(write, layer, new tokens, capacity) of each in-place cache write whose lengths are static ints."""
    from .patterns import predicates as P
    from .patterns.sites import find_cache_writes

    out = []
    for w in find_cache_writes(gm):
        if not w.is_inplace:
            continue
        buf, new = P.shape_of(w.buffer), P.shape_of(w.new)
        if not buf or not new or len(buf) <= w.seq_dim or len(new) <= w.seq_dim:
            continue
        cap, t = buf[w.seq_dim], new[w.seq_dim]
        if isinstance(cap, int) and isinstance(t, int):
            out.append((w, w.layer, t, cap))
    return out


def oversized_write(gm) -> str | None:
    """A message when some cache write of ``gm`` writes more new tokens than its cache holds, else None."""
    for w, layer, t, cap in _static_writes(gm):
        if t > cap:
            where = f"layer {layer}" if layer is not None else w.buffer.name
            return (f"antkv: this call writes {t} new tokens into a static KV cache of {cap} positions ({where}); "
                    f"{FIX}")
    return None


def position_guard(gm):
    """A check ``guard(args)`` run before the compiled (not rewritten) graph: raises CacheCapacityError when
    ``cumulative_length + new tokens`` passes the cache's end; None when the graph has no such write."""
    phs = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    checks = []
    for w, layer, t, cap in _static_writes(gm):
        counter = w.counter
        while counter is not None and counter.op == "call_method" and counter.target == "to" and counter.args:
            counter = counter.args[0]  # cumulative_length.to(device)
        if counter is not None and counter in phs:
            checks.append((phs[counter], layer, t, cap))
    checks = list(dict.fromkeys(checks))
    if not checks:
        return None

    def guard(args) -> None:
        for i, layer, t, cap in checks:
            counter = args[i]
            if not isinstance(counter, torch.Tensor) or counter.numel() != 1:
                continue
            start = int(counter)
            if start + t > cap:
                raise CacheCapacityError(
                    f"antkv: this call writes {t} new token(s) at positions {start}..{start + t - 1} but the static "
                    f"KV cache holds {cap} positions (layer {layer}); {FIX}")

    return guard


def guarded(compiled, guard):
    """``compiled`` with ``guard`` (from :func:`position_guard`) run on its arguments first."""
    if guard is None:
        return compiled

    def run(*args):
        guard(args)
        return compiled(*args)

    return run


def raising(message: str):
    """The compiled callable of a graph that can never run: raises ``message`` when called."""

    def run(*args):
        raise CacheCapacityError(message)

    return run
