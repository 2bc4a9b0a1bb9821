"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the default model (SmolLM2-135M-Instruct, float32, CPU, eval mode), loaded once.

    The same objects are shared by every test in the session: do not modify the model (weights, hooks, attention
    implementation) without restoring it.
    """
    from antkv_compile.models import load_model

    return load_model()
