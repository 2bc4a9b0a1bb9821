"""Pure predicates and small accessors over ``torch.fx.Node``.

The graph a torch.compile backend receives from Dynamo is the *pre-AOTAutograd* torch-level IR: it is
neither functional nor normalized, so one operation can appear under several spellings.  Each predicate
here accepts every spelling we have seen (or that torch documents) for one operation:

* ``call_function`` with a torch function (``torch.matmul``), a Python operator (``operator.matmul`` for
  ``a @ b``), the ``torch.Tensor`` method object (``torch.Tensor.index_copy_``, what ``fx.symbolic_trace``
  records), or an ATen overload packet / overload (``torch.ops.aten.index_copy_`` /
  ``torch.ops.aten.index_copy_.default``, what ``make_fx`` and post-grad graphs record);
* ``call_method`` with the method name (``"index_copy_"``), which is how Dynamo records ``x.index_copy_(...)``
  and also ``torch.Tensor.index_copy_(x, ...)``.

Every predicate is side-effect free and tolerates non-``Node`` arguments (returns False), so they can be
applied blindly to ``node.args`` entries.  Accessors (``call_arg``, ``tensor_meta``...) read, never write.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

__all__ = [
    "is_op",
    "call_arg",
    "tensor_meta",
    "shape_of",
    "dtype_of",
    "is_placeholder",
    "is_sdpa",
    "is_sdpa_like",
    "is_flex_attention",
    "is_index_copy_",
    "is_index_put_",
    "is_setitem",
    "is_copy_",
    "is_cat",
    "is_matmul",
    "is_softmax",
    "is_dropout",
    "is_mul",
    "is_div",
    "is_add",
    "is_sub",
    "is_tanh",
    "is_comparison",
    "is_floordiv",
    "is_getitem",
    "node_value",
    "is_expand",
    "is_reshape",
    "is_unsqueeze",
    "is_transpose_last2",
    "is_layout_noop",
    "is_dtype_cast",
    "is_inplace_add",
    "is_arange",
    "is_alloc",
    "is_inplace_mutation",
    "is_full_slice",
    "const_number",
]

aten = torch.ops.aten


def _targets(*objs: Any) -> frozenset:
    """Collect hashable targets; an OpOverloadPacket also contributes its ``.default`` overload."""
    out = set()
    for obj in objs:
        if obj is None:
            continue
        out.add(obj)
        default = getattr(obj, "default", None)
        if isinstance(default, torch._ops.OpOverload):
            out.add(default)
    return frozenset(out)


def _aten(name: str):
    return getattr(aten, name, None)


def is_op(node: Any, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    """True if ``node`` is a ``call_function`` to one of ``functions`` or a ``call_method`` named in ``methods``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        try:
            return node.target in functions
        except TypeError:  # unhashable target
            return False
    if node.op == "call_method":
        return node.target in methods
    return False


def call_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, whether passed positionally (at ``index``, counting ``self`` for methods
    as 0) or as keyword.  ``index < 0`` means keyword-only."""
    if name in node.kwargs:
        return node.kwargs[name]
    if 0 <= index < len(node.args):
        return node.args[index]
    return default


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor recorded for ``node``: ``meta["example_value"]`` on Dynamo graphs, ``meta["val"]`` on
    ATen graphs; None when absent or not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("example_value", "val"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def node_value(node: Any) -> Any:
    """What the tracer recorded for ``node`` (a fake tensor, a SymInt, ...), or None."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("example_value", "val"):
        if key in node.meta:
            return node.meta[key]
    return None


def shape_of(node: Any) -> tuple | None:
    """Shape from the node's fake tensor (entries may be SymInts), or None."""
    t = tensor_meta(node)
    return tuple(t.shape) if t is not None else None


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_meta(node)
    return t.dtype if t is not None else None


def is_placeholder(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


# --------------------------------------------------------------------------------------------------
# attention ops

_SDPA = _targets(
    torch._C._nn.scaled_dot_product_attention,  # what Dynamo records; F.scaled_dot_product_attention is this object
    torch.nn.functional.scaled_dot_product_attention,
    _aten("scaled_dot_product_attention"),
)
_SDPA_VARIANTS = _targets(
    *(
        _aten(n)
        for n in (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_attention_math",
            "_scaled_dot_product_fused_attention_overrideable",
        )
    )
)


def is_sdpa(node: Any) -> bool:
    """``scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False)`` -- as ``torch._C._nn.scaled_dot_product_attention`` (Dynamo, also reached through
    ``torch.nn.functional.scaled_dot_product_attention``) or ``aten.scaled_dot_product_attention``."""
    return is_op(node, _SDPA)


def is_sdpa_like(node: Any) -> bool:
    """``is_sdpa`` plus the backend-specific ATen SDPA ops that appear after AOTAutograd
    (``_scaled_dot_product_flash_attention_for_cpu``, ``..._cudnn_attention``...) -- attention we cannot
    rewrite at this level, used to report it."""
    return is_sdpa(node) or is_op(node, _SDPA_VARIANTS)


def is_flex_attention(node: Any) -> bool:
    """``flex_attention`` (function or higher-order op)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "") or str(node.target)
    return "flex_attention" in name


# --------------------------------------------------------------------------------------------------
# cache writes

_INDEX_COPY_ = _targets(torch.Tensor.index_copy_, _aten("index_copy_"))
_INDEX_PUT_ = _targets(torch.Tensor.index_put_, _aten("index_put_"))
_COPY_ = _targets(torch.Tensor.copy_, _aten("copy_"))


def is_index_copy_(node: Any) -> bool:
    """In-place ``buf.index_copy_(dim, index, src)``: method call, ``torch.Tensor.index_copy_`` or
    ``aten.index_copy_``.  (The functional ``torch.index_copy`` is not a cache write and is excluded.)"""
    return is_op(node, _INDEX_COPY_, ("index_copy_",))


def is_index_put_(node: Any) -> bool:
    """In-place ``buf.index_put_(indices, values)``."""
    return is_op(node, _INDEX_PUT_, ("index_put_",))


def is_setitem(node: Any) -> bool:
    """``buf[idx] = value`` -> ``operator.setitem(buf, idx, value)`` (also the ``__setitem__`` method)."""
    return is_op(node, _targets(operator.setitem, torch.Tensor.__setitem__), ("__setitem__",))


def is_copy_(node: Any) -> bool:
    """In-place ``dst.copy_(src)``."""
    return is_op(node, _COPY_, ("copy_",))


def is_cat(node: Any) -> bool:
    """``torch.cat`` / ``torch.concat`` / ``torch.concatenate`` / ``aten.cat``."""
    return is_op(node, _targets(torch.cat, torch.concat, torch.concatenate, _aten("cat")))


# --------------------------------------------------------------------------------------------------
# arithmetic / attention pieces

def is_matmul(node: Any) -> bool:
    """``torch.matmul``, ``a @ b`` (``operator.matmul``), ``a.matmul(b)``, ``torch.bmm``, ``aten.matmul/bmm``."""
    return is_op(
        node,
        _targets(torch.matmul, operator.matmul, torch.bmm, _aten("matmul"), _aten("bmm")),
        ("matmul", "bmm", "__matmul__"),
    )


def is_softmax(node: Any) -> bool:
    """``F.softmax``, ``torch.softmax``, ``x.softmax``, ``aten._softmax/softmax.int``."""
    return is_op(
        node,
        _targets(torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, _aten("softmax"),
                 _aten("_softmax"), getattr(_aten("softmax"), "int", None)),
        ("softmax",),
    )


def is_dropout(node: Any) -> bool:
    """``F.dropout`` / ``torch.dropout`` / ``aten.dropout`` / ``x.dropout`` (the Dynamo graph keeps it even at p=0)."""
    return is_op(node, _targets(torch.nn.functional.dropout, torch.dropout, _aten("dropout")), ("dropout",))


def is_mul(node: Any) -> bool:
    return is_op(node, _targets(operator.mul, torch.mul, torch.multiply, _aten("mul")), ("mul", "multiply", "__mul__"))


def is_div(node: Any) -> bool:
    return is_op(
        node,
        _targets(operator.truediv, torch.div, torch.divide, torch.true_divide, _aten("div")),
        ("div", "divide", "true_divide", "__truediv__"),
    )


def is_add(node: Any) -> bool:
    return is_op(node, _targets(operator.add, torch.add, _aten("add")), ("add", "__add__"))


def is_sub(node: Any) -> bool:
    return is_op(node, _targets(operator.sub, torch.sub, torch.subtract, _aten("sub")), ("sub", "subtract", "__sub__"))


def is_tanh(node: Any) -> bool:
    return is_op(node, _targets(torch.tanh, _aten("tanh")), ("tanh",))


_CMP_FUNCS = _targets(operator.gt, operator.ge, operator.lt, operator.le, torch.gt, torch.ge, torch.lt, torch.le,
                      _aten("gt"), _aten("ge"), _aten("lt"), _aten("le"))
_CMP_METHODS = ("gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__")


def is_comparison(node: Any) -> bool:
    """Ordering comparisons ``<``, ``<=``, ``>``, ``>=`` in any spelling (the building blocks of index masks)."""
    return is_op(node, _CMP_FUNCS, _CMP_METHODS)


def is_floordiv(node: Any) -> bool:
    return is_op(node, _targets(operator.floordiv, torch.floor_divide, _aten("floor_divide")),
                 ("floor_divide", "__floordiv__"))


def is_getitem(node: Any) -> bool:
    return is_op(node, _targets(operator.getitem), ("__getitem__",))


def is_expand(node: Any) -> bool:
    return is_op(node, _targets(_aten("expand")), ("expand",))


def is_reshape(node: Any) -> bool:
    """``reshape`` / ``view`` / ``torch.reshape`` / ``aten.view/reshape/_unsafe_view``."""
    return is_op(
        node,
        _targets(torch.reshape, _aten("reshape"), _aten("view"), _aten("_unsafe_view")),
        ("reshape", "view"),
    )


def is_unsqueeze(node: Any) -> bool:
    return is_op(node, _targets(torch.unsqueeze, _aten("unsqueeze")), ("unsqueeze",))


def is_transpose_last2(node: Any) -> bool:
    """``k.transpose(2, 3)`` / ``k.transpose(-2, -1)`` / ``k.mT`` -style swaps of the last two dims of a 4-D tensor."""
    if not is_op(node, _targets(torch.transpose, _aten("transpose"), getattr(_aten("transpose"), "int", None)),
                 ("transpose", "swapaxes", "swapdims")):
        return False
    dims = node.args[1:3]
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    rank = len(shape_of(node) or (0,) * 4)
    norm = {d % rank for d in dims}
    return norm == {rank - 2, rank - 1}


def is_layout_noop(node: Any) -> bool:
    """Value-preserving layout ops: ``contiguous``, ``clone`` (no memory-format change of values)."""
    return is_op(node, _targets(torch.clone, _aten("clone"), _aten("contiguous")), ("contiguous", "clone"))


_CAST_METHODS = ("to", "float", "half", "bfloat16", "double", "long", "int", "type_as", "type")


def is_dtype_cast(node: Any) -> bool:
    """``x.to(dtype)`` / ``x.to(device)`` / ``x.float()`` / ``x.type_as(y)`` / ``aten._to_copy``."""
    return is_op(node, _targets(_aten("_to_copy"), getattr(_aten("to"), "dtype", None)), _CAST_METHODS)


def is_inplace_add(node: Any) -> bool:
    """``x.add_(n)`` / ``x += n`` (``operator.iadd``) / ``aten.add_``."""
    return is_op(node, _targets(operator.iadd, torch.Tensor.add_, _aten("add_")), ("add_", "__iadd__"))


def is_arange(node: Any) -> bool:
    return is_op(node, _targets(torch.arange, _aten("arange")), ())


def is_alloc(node: Any) -> bool:
    """In-graph allocations a lazily initialised cache starts from: ``torch.zeros/empty/full/tensor``."""
    return is_op(
        node,
        _targets(torch.zeros, torch.empty, torch.full, torch.tensor, torch.zeros_like, torch.empty_like,
                 _aten("zeros"), _aten("empty"), _aten("full")),
        ("new_zeros", "new_empty"),
    )


def is_inplace_mutation(node: Any, tensor: fx.Node) -> bool:
    """True if ``node`` mutates ``tensor`` in place: ``tensor`` is the first argument of a ``setitem`` or of a
    method/function whose name ends in ``_`` (``index_copy_``, ``copy_``, ``add_``, ``fill_``...)."""
    if not isinstance(node, fx.Node) or not node.args or node.args[0] is not tensor:
        return False
    if is_setitem(node):
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            return bool(node.target._schema.is_mutable)
        return name.endswith("_") and not name.startswith("__")
    return False


def is_full_slice(obj: Any) -> bool:
    """``slice(None, None, None)`` -- the ``:`` of an index tuple."""
    return isinstance(obj, slice) and obj.start is None and obj.stop is None and obj.step is None


def const_number(obj: Any) -> float | None:
    """A Python number argument (int/float, not bool), or None.  Nodes are never constants here."""
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return None
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
