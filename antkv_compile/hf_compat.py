"""The keyword a Hugging Face model takes its KV cache by.

transformers 5.2x renamed ``past_key_values=`` to ``cache=`` (the old name still works, with a logged
"``past_key_values``/``cache_params`` are deprecated. Use ``cache`` instead."); earlier 5.x releases only
know ``past_key_values``. Our own calls use whichever the model's ``forward`` declares, so they are quiet on
every version.
"""
from __future__ import annotations

import functools
import inspect

__all__ = ["cache_keyword", "default_cache_keyword", "with_cache"]


@functools.lru_cache(maxsize=None)
def _keyword_of(forward_type) -> str:
    try:
        params = inspect.signature(forward_type).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` when ``model.forward`` takes it, else ``"past_key_values"``."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module
    return _keyword_of(type(model).forward)


def with_cache(model, cache, **kwargs) -> dict:
    """``kwargs`` plus the cache under the keyword ``model`` takes (``model(**with_cache(model, c, input_ids=x))``)."""
    return {**kwargs, cache_keyword(model): cache}


def default_cache_keyword() -> str:
    """The keyword of this transformers' Llama models (for code that runs Llama-shaped models only)."""
    from transformers import LlamaForCausalLM

    return _keyword_of(LlamaForCausalLM.forward)
