"""Every call is compressed, whatever the prompt length: `model.compile(backend="antkv")` + `generate`.

After a second prompt length Dynamo re-traces the forward with dynamic shapes (a symbolic cache length and
query length). The rewrite must handle those graphs (the store's capacity is then taken at run time), so that
prompts of any length, and a chat that reuses one cache over several turns, all run the antkv op: counted here
with the profiler (an uncompressed fallback runs no `antkv_rt::cache_attend` at all). At anchor ratio 1.0
every coded token is also kept exact, so the tokens must equal the uncompiled model's.
"""
import inspect

import pytest
import torch
from transformers import StaticCache

from antkv_compile.backend import last_compiles
from antkv_compile.models import tiny_model

LAYERS = 2  # tiny_model("llama") default
NEW = 5


def _prompt(n, seed):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache_kw(model):
    """transformers renamed generate's `past_key_values` to `cache` within 5.x: use what this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _op_calls(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name == "antkv_rt::cache_attend")


@pytest.fixture
def compiled(request):
    torch._dynamo.reset()
    model = tiny_model("llama")
    model.compile(backend="antkv", options={"anchor_ratio": 1.0, "window": 4, "inner": request.param})
    last_compiles.clear()
    yield model
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", ["inductor"], indirect=True)
def test_prompts_of_different_lengths_are_all_compressed(compiled):
    ref = tiny_model("llama")
    for i, n in enumerate((48, 64, 80, 33)):
        ids = _prompt(n, seed=i)
        out, calls = _op_calls(lambda: compiled.generate(ids, max_new_tokens=NEW, do_sample=False,
                                                         cache_implementation="static"))
        assert calls >= LAYERS * NEW, f"prompt of {n} tokens ran {calls} antkv ops (not compressed)"
        expected = ref.generate(ids, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
        assert out.tolist() == expected.tolist(), f"prompt of {n} tokens"
    assert all(r["after"] is not None for r in last_compiles), [r["plan"].fallback_reason for r in last_compiles]
    # static prefill + decode, then one dynamic prefill + decode cover every later length
    assert len(last_compiles) <= 4


@pytest.mark.parametrize("compiled", ["eager"], indirect=True)
def test_multi_turn_chat_on_one_cache_stays_compressed(compiled):
    ref = tiny_model("llama")

    def chat(model):
        cache = StaticCache(config=model.config, max_cache_len=128)
        ids, turns = None, []
        for i, n in enumerate((20, 7, 13)):
            new = _prompt(n, seed=100 + i)
            ids = new if ids is None else torch.cat([ids, new], 1)
            ids, calls = _op_calls(lambda: model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                                          **{_cache_kw(model): cache}))
            turns.append((ids.clone(), calls))
        return turns

    got, want = chat(compiled), chat(ref)
    for turn, ((ids, calls), (ref_ids, _)) in enumerate(zip(got, want)):
        assert calls >= LAYERS * NEW, f"turn {turn} ran {calls} antkv ops (not compressed)"
        assert ids.tolist() == ref_ids.tolist(), f"turn {turn}"
    assert all(r["after"] is not None for r in last_compiles), [r["plan"].fallback_reason for r in last_compiles]


def test_a_frame_sent_to_eager_by_the_recompile_limit_is_reported():
    """Past Dynamo's recompile limit a frame runs eagerly, with the dense cache: one antkv warning says so."""
    import warnings

    from antkv_compile.backend import AntKVFallbackWarning, _WARNED

    torch._dynamo.reset()
    _WARNED.clear()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="antkv", options={"inner": "eager", "anchor_ratio": 1.0})
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (8, 9, 10):
            cache = StaticCache(config=model.config, max_cache_len=n)
            with torch.no_grad():
                compiled(input_ids=_prompt(n, seed=n), **{_cache_kw(model): cache}, use_cache=True)
    ours = [str(w.message) for w in caught if issubclass(w.category, AntKVFallbackWarning)]
    assert any("UNCOMPRESSED" in m and "recompile_limit" in m for m in ours), ours
    torch._dynamo.reset()
