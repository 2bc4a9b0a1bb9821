"""A prompt or step that does not fit the static cache raises a Python exception naming the lengths and what
to change, before any kernel runs (Inductor's out-of-bounds dense write used to abort the process)."""
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import StaticCache

from antkv_compile.cache_fit import CacheCapacityError
from antkv_compile.models import tiny_model


def _ids(n):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(1))


def test_prompt_longer_than_cache_raises_in_python_not_abort():
    """The issue's case through real Inductor, in a subprocess: before, the process died (SIGABRT)."""
    code = (
        "import torch, warnings\n"
        "from transformers import StaticCache\n"
        "from antkv_compile.models import tiny_model\n"
        "warnings.simplefilter('ignore')\n"
        "m = tiny_model('llama')\n"
        "c = torch.compile(m, backend='antkv')\n"
        "ids = torch.randint(3, 500, (1, 32))\n"
        "try:\n"
        "    with torch.no_grad():\n"
        "        c(input_ids=ids, past_key_values=StaticCache(config=m.config, max_cache_len=16))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CacheCapacityError antkv: this call writes 32 new tokens into a static KV cache of 16 positions" in r.stdout
    assert "max_cache_len" in r.stdout


def test_step_past_the_end_of_a_fallback_graph_raises_before_the_graph(monkeypatch):
    """A graph the backend does not rewrite keeps the dense write: decoding past the cache's end is stopped by the
    backend's guard (before: IndexError from the eager graph, an abort from Inductor's kernel)."""
    import antkv_compile.passes as passes
    from antkv_compile.passes.rewrite import RewritePlan

    monkeypatch.setattr(passes, "plan_rewrite", lambda report: RewritePlan(report, fallback_reason="test: forced"))
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="antkv", options={"inner": "eager"})
    cache = StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad(), pytest.warns(UserWarning):
        out = compiled(input_ids=_ids(8), past_key_values=cache)
        for _ in range(2):
            out = compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
        with pytest.raises(CacheCapacityError, match=r"writes 1 new token\(s\) at positions 10..10 but the static KV "
                                                     r"cache holds 10 positions"):
            compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)


def test_step_past_the_end_of_the_store_raises():
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="antkv", options={"inner": "eager", "anchor_ratio": 1.0, "window": 4})
    cache = StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad(), _codebook_warning_ignored():
        out = compiled(input_ids=_ids(8), past_key_values=cache)
        for _ in range(2):
            out = compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
        with pytest.raises(Exception, match="holds 10 of 10 tokens and cannot take 1 more; allocate a larger cache"):
            compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)


@contextmanager
def _codebook_warning_ignored():
    """The backend's no-artifact warning is emitted once per process (another test may have had it first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
