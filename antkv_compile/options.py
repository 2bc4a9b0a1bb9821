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


def check_offload(offload, retrieve_fraction, retrieve_min) -> None:
    """The tiered retrieval mode's options (``offload``, ``retrieve_fraction``, ``retrieve_min``), with what to
    change when they are wrong."""
    if offload not in (None, "host"):
        raise ValueError(f"offload must be None (everything on the device) or 'host' (a full-precision copy of the "
                         f"coded tokens in host memory, retrieved by their codes), got {offload!r}")
    if isinstance(retrieve_fraction, bool) or not isinstance(retrieve_fraction, (int, float)) \
            or not 0.0 <= float(retrieve_fraction) <= 1.0:
        raise ValueError(f"retrieve_fraction is the share of coded tokens retrieved exactly per step, a number in "
                         f"[0, 1] (0.02 = 2 %), got {retrieve_fraction!r}")
    if isinstance(retrieve_min, bool) or not isinstance(retrieve_min, int) or retrieve_min < 0:
        raise ValueError(f"retrieve_min is the fewest tokens retrieved per step, an integer >= 0, "
                         f"got {retrieve_min!r}")
