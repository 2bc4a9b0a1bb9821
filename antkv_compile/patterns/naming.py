"""Which layer a cache tensor belongs to, from Dynamo's placeholder names and module stacks.

Dynamo names a graph input after its source with non-identifier characters replaced by ``_``, lower-cased
for the node name.  What we see for the transformers caches (torch 2.13, transformers 5.23):

====================================================  ============================================
source                                                placeholder node name
====================================================  ============================================
``model(past_key_values=cache)`` -> ``L['kwargs']['past_key_values'].layers[0].keys``
                                                      ``l_kwargs_past_key_values_layers_0_keys``
``model.forward(ids, None, None, cache)``             ``l_args_3_layers_0_keys``
``layers[0].values`` / ``layers[0].cumulative_length``  ``..._layers_0_values`` / ``..._layers_0_cumulative_length``
4.4x monolithic ``StaticCache``: ``key_cache[0]``     ``..._key_cache_0_`` / ``..._value_cache_0_``
====================================================  ============================================

So the prefix depends on how the model was called; only the suffix is reliable.  For caches allocated
inside the graph (a lazily initialised cache traced during prefill: ``torch.zeros`` nodes), there is no
name: ``layer_from_module_stack`` reads ``meta["nn_module_stack"]`` instead (``L['self'].model.layers.0
.self_attn`` -> 0).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch.fx as fx

__all__ = ["CacheTensorName", "parse_cache_name", "layer_from_module_stack"]

# 5.x / 4.5x layered caches: past_key_values.layers[i].keys / .values / .cumulative_length
_LAYERED = re.compile(r"(?:^|_)layers_(\d+)_(keys|values|cumulative_length)_?$")
# 4.4x-4.5x monolithic caches: past_key_values.key_cache[i] / value_cache[i]
_MONOLITHIC = re.compile(r"(?:^|_)(key|value)_cache_(\d+)_?$")
_MODULE_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


@dataclasses.dataclass(frozen=True)
class CacheTensorName:
    """A parsed cache placeholder name: the layer index and what the tensor is."""

    layer: int
    role: str  # "keys" | "values" | "cumulative_length"


def parse_cache_name(node_or_name: Any) -> CacheTensorName | None:
    """Parse a cache placeholder (node or name).  Returns None for anything that is not named like a
    transformers cache tensor (parameters, inputs, other buffers)."""
    name = node_or_name.name if isinstance(node_or_name, fx.Node) else str(node_or_name)
    name = name.lower()
    m = _LAYERED.search(name)
    if m:
        return CacheTensorName(int(m.group(1)), m.group(2))
    m = _MONOLITHIC.search(name)
    if m:
        return CacheTensorName(int(m.group(2)), "keys" if m.group(1) == "key" else "values")
    return None


def layer_from_module_stack(node: Any) -> int | None:
    """Layer index of the innermost ``...layers.<i>...`` module in ``node.meta["nn_module_stack"]``."""
    if not isinstance(node, fx.Node):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else str(value)
        # Dynamo writes "L['self'].model.layers.0.self_attn"; older versions "L__self___model_layers_0_..."
        m = _MODULE_LAYER.search(str(path).replace("[", ".").replace("]", "").replace("'", ""))
        if m:
            return int(m.group(1))
        m = re.search(r"_layers_(\d+)_", str(path))
        if m:
            return int(m.group(1))
    return None
