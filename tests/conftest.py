"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI runs a fixed set of hypothesis examples (derandomized): a red CI is then reproducible, never a dice roll.
# Local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``distributed`` (torchrun, two processes) run only when a ``-m`` expression names them
    (``-m distributed``); the normal run skips them, it would take ~1.5 min more."""
    if "distributed" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="multi-process test: run with -m distributed")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the default model (SmolLM2-135M-Instruct, float32, CPU, eval mode), loaded once.

    The same objects are shared by every test in the session: do not modify the model (weights, hooks, attention
    implementation) without restoring it.
    """
    from antkv_compile.models import load_model

    return load_model()
