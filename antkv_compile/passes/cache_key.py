"""The quantization config in Inductor's compile-cache key.

Inductor's FX-graph cache keys on the graph and on ``torch._inductor.config``; it does not know our
config. Two guards keep two configs from ever sharing a compiled artifact: (1) the rewritten graph
carries the session id (one per config fingerprint) as a constant op argument, and (2) the backend
installs :class:`ConfigKeyPass` as ``post_grad_custom_post_pass`` (scoped by ``config_patches``, never
assigned globally) whose ``uuid()`` hashes this file and the config fingerprint. A user-supplied
post-grad pass is chained inside it (torch 2.11 accepts one callable per slot).
"""
from __future__ import annotations

import hashlib

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["ConfigKeyPass"]


class ConfigKeyPass(CustomGraphPass):
    def __init__(self, fingerprint: str, inner=None) -> None:
        self.fingerprint = fingerprint
        self.inner = inner

    def __call__(self, graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = ""
        if self.inner is not None:
            inner = str(self.inner.uuid()) if hasattr(self.inner, "uuid") else repr(self.inner)
        extra = f"{self.fingerprint}|{inner}".encode()
        return hashlib.sha256(get_hash_for_files((__file__,)) + extra).hexdigest()
