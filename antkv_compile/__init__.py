"""antkv_compile: a torch.compile backend (``backend="antkv"``) that compresses the KV cache (AnTKV).

Importing the package is light: submodules load on first use.
"""
from __future__ import annotations

__all__ = ["explain", "antkv_backend"]


def __getattr__(name):
    if name == "explain":
        from .explain import explain

        return explain
    if name == "antkv_backend":
        from .backend import antkv_backend

        return antkv_backend
    raise AttributeError(f"module 'antkv_compile' has no attribute {name!r}")
