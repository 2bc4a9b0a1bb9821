"""Checks on ``torch.compile(..., backend="antkv", options={...})`` keys: every key must be antkv's own or an
Inductor config key (what ``backend="inductor"`` accepts), else a clear error with the closest names."""
from __future__ import annotations

import difflib


class UnknownOptionError(ValueError):
    """An ``options`` key that neither antkv nor Inductor knows."""


def inductor_keys() -> set[str]:
    """The Inductor config keys ``options`` may set (dotted names such as ``triton.cudagraphs`` included)."""
    import torch._inductor.config as inductor_config

    return set(inductor_config.get_config_copy())


def check_option_keys(options: dict, ours: set[str]) -> None:
    """Raise :class:`UnknownOptionError` for the first key that is neither in ``ours`` nor an Inductor key."""
    unknown = [k for k in options if k not in ours]
    if not unknown:
        return
    inductor = inductor_keys()
    for key in unknown:
        if not isinstance(key, str):
            raise UnknownOptionError(f"options keys must be strings, got {key!r}")
        if key in inductor:
            continue
        close = difflib.get_close_matches(key, sorted(ours), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if not close:
            near = difflib.get_close_matches(key, sorted(inductor), n=1, cutoff=0.8)
            hint = f" (did you mean the Inductor option {near[0]!r}?)" if near else ""
        raise UnknownOptionError(
            f"unknown antkv option {key!r}{hint}; antkv options are {', '.join(sorted(ours))}, "
            "and any torch._inductor.config key is passed on to Inductor")
