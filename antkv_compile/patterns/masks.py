"""Attention-mask analysis: kind (bool / additive), shape fit, and sliding-window / chunk detection.

What transformers 5.x puts in the Dynamo graph (``masking_utils``, torch 2.13):

* SDPA, static cache -- a bool mask built from index arithmetic, True = attend::

      q_idx = (arange(q_len) + cumulative_length)[None, None, :, None]
      kv_idx = (arange(L) + 0)[None, None, None, :]
      mask = (kv_idx <= q_idx).expand(B, -1, q_len, L)                       # full attention
      mask = (ones & (kv_idx > q_idx - W) & (kv_idx <= q_idx)).expand(...)    # sliding window W

* eager -- the same bool mask turned additive: ``torch.where(mask, zeros(()), finfo.min)``, then
  ``scores + mask`` (older versions slice it first: ``mask[:, :, :, :kv_len]``).
* SDPA with no mask needed (DynamicCache decode, prefill on an empty cache) -- ``attn_mask=None`` and
  possibly ``is_causal=True``.  A window that does not bite at this shape leaves no trace in that case.

The window constant is found by searching the mask's ancestors for an ordering comparison with an
operand ``x - W`` (or ``x + (-W)``), or ``(a - b) <op> W``; block-local (chunked) masks show a floor
division instead.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx

from . import predicates as P
from .matches import MaskInfo

__all__ = ["analyze_mask", "find_window_constant", "mask_kv_slice"]

_SEARCH_LIMIT = 256  # ancestors visited per mask; mask construction is a few dozen nodes


def mask_kv_slice(node) -> fx.Node | None:
    """``m[:, :, :, :n]`` (a trailing kv-length slice) -> ``m``; else None."""
    if not P.is_getitem(node) or len(node.args) != 2 or not isinstance(node.args[1], tuple):
        return None
    idx = node.args[1]
    if len(idx) != 4 or not all(P.is_full_slice(i) for i in idx[:3]):
        return None
    s = idx[3]
    if isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _window_from_operand(op) -> int | None:
    """``x - W`` or ``x + (-W)`` with a positive int constant W."""
    if not isinstance(op, fx.Node) or len(op.args) < 2:
        return None
    c = P.const_number(op.args[1])
    if c is None or not isinstance(c, int):
        return None
    if P.is_sub(op) and c > 0:
        return c
    if P.is_add(op) and c < 0:
        return -c
    return None


def find_window_constant(mask: fx.Node) -> tuple:
    """Search the mask construction for a sliding-window constant and for chunking.

    Returns ``(window or None, chunked: bool)``.  If several windows are found, the smallest is returned.
    """
    windows = []
    chunked = False
    seen = set()
    queue = collections.deque([mask])
    while queue and len(seen) < _SEARCH_LIMIT:
        node = queue.popleft()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node.op == "placeholder" or node.op == "get_attr":
            continue
        if P.is_comparison(node):
            a, b = (node.args + (None, None))[:2]
            for x, other in ((a, b), (b, a)):
                w = _window_from_operand(x)
                if w is not None:
                    windows.append(w)
                # (q - kv) < W  /  W > (q - kv)
                if isinstance(x, fx.Node) and P.is_sub(x) and all(isinstance(t, fx.Node) for t in x.args[:2]):
                    c = P.const_number(other)
                    if isinstance(c, int) and c > 0:
                        windows.append(c)
        if P.is_floordiv(node):
            chunked = True
        for inp in node.all_input_nodes:
            if inp not in seen:
                queue.append(inp)
    return (min(windows) if windows else None), chunked


def analyze_mask(node, *, q_len=None, kv_len=None, num_heads=None) -> MaskInfo:
    """Describe the attention-mask operand ``node`` (as consumed by SDPA, or added to eager scores)."""
    source = mask_kv_slice(node) or node
    t = P.tensor_meta(node)
    shape = tuple(t.shape) if t is not None else None
    problem = None
    if t is None:
        if P.is_op(node, {torch.where}, ("where",)):
            kind = "additive"
        elif P.is_comparison(node) or P.is_op(node, (), ("expand",)):
            kind = "bool"
        else:
            kind, problem = "unknown", "no tensor metadata on the mask"
    elif t.dtype == torch.bool:
        kind = "bool"
    elif t.dtype.is_floating_point:
        kind = "additive"
    else:
        kind, problem = "unknown", f"mask dtype {t.dtype}"
    if shape is not None and problem is None:
        if not 2 <= len(shape) <= 4:
            problem = f"mask rank {len(shape)}"
        elif isinstance(kv_len, int) and isinstance(shape[-1], int) and shape[-1] not in (1, kv_len):
            problem = f"mask kv length {shape[-1]} != key length {kv_len}"
        elif isinstance(q_len, int) and isinstance(shape[-2], int) and shape[-2] not in (1, q_len):
            problem = f"mask query length {shape[-2]} != query length {q_len}"
        elif len(shape) == 4 and isinstance(num_heads, int) and isinstance(shape[1], int) \
                and shape[1] not in (1, num_heads):
            problem = f"mask heads {shape[1]} != query heads {num_heads}"
    window, chunked = find_window_constant(source)
    return MaskInfo(node=node, source=source, kind=kind, shape=shape, sliding_window=window, chunked=chunked,
                    problem=problem)
