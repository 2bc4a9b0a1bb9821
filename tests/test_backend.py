"""backend="antkv" end to end on tiny random-weight models (CPU).

Bounds: with anchor_ratio=1.0 every flushed token is an anchor, so attention is exact up to float32
reassociation: greedy tokens must equal the uncompiled model's and logits agree to 1e-4. With quantization
the compiled model must match the method core's eager reference (the same ``AnTKVLayerStore`` driven through
``hf_routing`` with the same codebooks) to 1e-4 on the logits (same code path; only Inductor's fusion of
the non-attention ops differs).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache

from antkv_compile.backend import AntKVCalibrationWarning, AntKVFallbackWarning, antkv_backend, last_compiles
from antkv_compile.models import tiny_model
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
from antkv_compile.runtime.state import session_for

CAP = 24
PROMPT = 9
STEPS = 4


def _model(arch, **kw):
    if arch == "gemma3":
        kw.setdefault("sliding_window", 8)
    return tiny_model(arch, **kw)


def _prompt(model, n=PROMPT, seed=1):
    return torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def greedy(fn, model, ids, steps=STEPS, cap=CAP, teacher=None):
    """Prefill + decode loop through ``fn`` with a StaticCache: (tokens, last-position logits per step, cache)."""
    cache = StaticCache(config=model.config, max_cache_len=cap)
    toks, logits = [], []
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        for i in range(steps):
            logits.append(out.logits[:, -1].float())
            nxt = out.logits[:, -1:].argmax(-1) if teacher is None else teacher[:, i:i + 1]
            toks.append(int(nxt))
            out = fn(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return toks, torch.cat(logits), cache


def reference(model, ids, toks, options):
    """The method core's eager reference: AnTKVLayerStore per layer via hf_routing, same codebooks."""
    from antkv_compile.backend import parse_options
    from antkv_compile.hf_routing import chunk_logits, routed

    config, artifact, _, _ = parse_options(options)
    session = session_for(config, artifact)
    stores = {}

    def handler(layer, q, k, v, scale):
        if layer not in stores:
            cbk, cbv = session.codebooks[layer]
            geom = StoreGeometry(k.shape[0], k.shape[1], k.shape[3], CAP, k.dtype, k.device, scale)
            rope = artifact.rope_table() if config.key_space == "pre_rope" else None
            stores[layer] = AnTKVLayerStore(geom, cbk, cbv, config, layer_index=layer, rope=rope)
        return stores[layer].attend(q, k, v)

    out = []
    with torch.no_grad(), routed(model, handler):
        out.append(chunk_logits(model, ids, 0)[:, -1])
        for i, t in enumerate(toks):
            out.append(chunk_logits(model, torch.tensor([[t]]), ids.shape[1] + i)[:, -1])
    return torch.cat(out).float()


def random_artifact(model, bits="1", seed=0):
    """A CodebookArtifact of random plain-VQ codebooks (coarse on purpose: quantization is visible)."""
    from antkv_compile.artifact import CodebookArtifact
    from antkv_compile.config import get_preset
    from antkv_compile.models import kv_geometry
    from antkv_compile.numerics.vq import random_codebook

    g = kv_geometry(model.config)
    p = get_preset(bits)
    gen = torch.Generator().manual_seed(seed)
    cbs = [[random_codebook(p, g.num_kv_heads, g.head_dim, generator=gen, scale=0.3) for _ in range(g.num_layers)]
           for _ in range(2)]
    manifest = {"preset": {"name": p.name, "sub_dim": p.sub_dim, "code_bits": p.code_bits, "stages": p.stages},
                "tensors_sha256": f"random-{model.config.model_type}-{g.num_layers}-{g.head_dim}-{bits}-{seed}", "model": {}}
    return CodebookArtifact(cbs[0], cbs[1], manifest)


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=antkv_backend, options=options)


# ----------------------------------------------------------------------------------------- registration
def test_entry_point_without_import():
    code = (
        "import sys, torch\n"
        "assert 'antkv' in torch._dynamo.list_backends()\n"
        "f = torch.compile(lambda x: x * 2, backend='antkv', options={'inner': 'eager'})\n"
        "assert f(torch.ones(2)).tolist() == [2.0, 2.0]\n"
        "print('ok', 'antkv_compile' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok True"  # loaded lazily by torch through the entry point


def test_mode_and_options_accepted():
    from antkv_compile.backend import _config_patches, parse_options

    cfg, art, release, rest = parse_options({"bits": "2", "anchor_ratio": 0.05, "window": 8, "max_autotune": False})
    assert (cfg.bits, cfg.anchor_ratio, cfg.window, art, release) == ("2", 0.05, 8, None, True)
    rest.pop("__inner"), rest.pop("__allow_model_mismatch")
    assert _config_patches("reduce-overhead", rest) == {"triton.cudagraphs": True, "max_autotune": False}
    assert _config_patches(None, {}) == {}
    with pytest.raises(ValueError):
        parse_options({"bits": "3"})


# ----------------------------------------------------------------------------------------- llama, Inductor
def test_llama_inductor_exact_and_quantized():
    model = _model("llama")
    ids = _prompt(model)
    ref_toks, ref_logits, _ = greedy(model, model, ids)
    last_compiles.clear()  # bounded log: count from empty
    calls_before = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        toks, logits, cache = greedy(compiled(model, anchor_ratio=1.0, window=4), model, ids)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    n_graphs = len(last_compiles) - calls_before
    assert n_graphs == 2  # prefill + decode, no recompiles over 4 decode steps
    assert all(r["plan"].rewrites for r in last_compiles[-2:])
    assert sum(issubclass(x.category, AntKVCalibrationWarning) for x in w) <= 1
    # dense buffers released
    assert all(l.keys.untyped_storage().nbytes() <= 4 for l in cache.layers)

    # quantized (1-bit, 10% anchors, window 4): equal to the eager reference with the same codebooks
    opts = dict(anchor_ratio=0.1, window=4, artifact=random_artifact(model))
    toks_q, logits_q, _ = greedy(compiled(model, **opts), model, ids, teacher=torch.tensor([ref_toks]))
    ref_q = reference(model, ids, toks_q, opts)
    torch.testing.assert_close(logits_q, ref_q, atol=1e-4, rtol=1e-4)
    assert (logits_q - ref_logits).abs().max() > 1e-4  # quantization actually happened
    from antkv_compile.backend import parse_options

    stores = session_for(*parse_options(opts)[:2]).stores.values()
    assert all(s.n_coded > s.num_anchors > 0 for s in stores)


def test_two_configs_never_share_a_compiled_graph():
    from antkv_compile.passes.cache_key import ConfigKeyPass
    from antkv_compile.runtime.state import config_fingerprint
    from antkv_compile.config import AnTKVConfig

    a, b = AnTKVConfig(bits="1", window=4), AnTKVConfig(bits="2", window=4)
    assert ConfigKeyPass(config_fingerprint(a, None)).uuid() != ConfigKeyPass(config_fingerprint(b, None)).uuid()
    assert ConfigKeyPass(config_fingerprint(a, None)).uuid() == ConfigKeyPass(config_fingerprint(a, None)).uuid()
    model = _model("llama")
    ids = _prompt(model)
    results = {}
    for bits in ("1", "2", "1"):
        opts = dict(bits=bits, anchor_ratio=0.0, window=4, artifact=random_artifact(model, bits))
        toks, logits, _ = greedy(compiled(model, **opts), model, ids, steps=2)
        torch.testing.assert_close(logits, reference(model, ids, toks, opts), atol=1e-4, rtol=1e-4)
        results.setdefault(bits, []).append(logits)
    assert (results["1"][0] - results["2"][0]).abs().max() > 1e-4
    torch.testing.assert_close(results["1"][0], results["1"][1])


# ----------------------------------------------------------------------------------------- model matrix
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"])
def test_model_matrix(arch):
    model = _model(arch)
    ids = _prompt(model)
    ref_toks, ref_logits, _ = greedy(model, model, ids)
    last_compiles.clear()  # bounded log: count from empty
    n0 = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        toks, logits, cache = greedy(compiled(model, anchor_ratio=1.0, window=4, inner="eager"), model, ids)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    records = last_compiles[n0:]
    assert len(records) == 2, [r["plan"].fallback_reason for r in records]
    assert all(r["plan"].rewrites for r in records)
    if arch == "gemma3":
        kept = {u.layer for r in records for u in r["plan"].kept_exact}
        assert kept == {0, 1, 3}  # sliding layers reported and left exact; layer 2 (global) rewritten
        assert {s.layer for r in records for s in r["plan"].sites} == {2}
        assert any("sliding-window" in str(x.message) for x in w)
        return
    # quantized vs the method core's eager reference
    opts = dict(anchor_ratio=0.1, window=4, inner="eager", artifact=random_artifact(model))
    toks_q, logits_q, _ = greedy(compiled(model, **opts), model, ids, teacher=torch.tensor([ref_toks]))
    torch.testing.assert_close(logits_q, reference(model, ids, toks_q, opts), atol=1e-4, rtol=1e-4)
    assert (logits_q - ref_logits).abs().max() > 1e-4  # quantization actually happened (same tokens fed)


# ----------------------------------------------------------------------------------------- fallback
def test_fallback_dynamic_cache_warns_once_and_is_exact():
    model = _model("llama")
    ids = _prompt(model)
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
    from antkv_compile import backend as B

    B._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            f = compiled(model, inner="eager")
            got = f(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
            f(input_ids=ids, past_key_values=DynamicCache(config=model.config))
    fallback = [x for x in w if issubclass(x.category, AntKVFallbackWarning)]
    assert len(fallback) == 1 and "dynamic_cache" in str(fallback[0].message)
    torch.testing.assert_close(got, ref)
    assert last_compiles[-1]["after"] is None


def test_fallback_is_plain_inductor():
    def f(x):
        return torch.softmax(x @ x.T, -1).sum(0)

    x = torch.randn(4, 8)
    torch._dynamo.reset()
    with pytest.warns(AntKVFallbackWarning, match="no_attention_site"):
        got = torch.compile(f, backend=antkv_backend)(x)
    torch.testing.assert_close(got, f(x))


def test_released_cache_refuses_dense_writes():
    from antkv_compile.runtime.state import release_dense

    t = torch.randn(1, 2, 8, 4)
    assert release_dense(t) and t.untyped_storage().nbytes() == 4
    t.zero_()  # cache.reset() still works
    with pytest.raises(RuntimeError):
        t.index_copy_(2, torch.tensor([0]), torch.ones(1, 2, 1, 4))


def test_eager_prefill_then_compiled_decode_rehomes_the_prefix():
    """An uncompiled prefill (what HF generate's compile_config does) leaves the prompt in the dense cache only:
    the first compiled step re-homes it into the store, then releases the dense buffers."""
    model = _model("llama")
    ids = _prompt(model)
    ref_toks, ref_logits, _ = greedy(model, model, ids)
    f = compiled(model, anchor_ratio=1.0, window=4, inner="eager")
    toks, logits, cache = greedy(lambda **kw: (model if kw["past_key_values"].get_seq_length() == 0 else f)(**kw),
                                 model, ids)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert all(l.keys.untyped_storage().nbytes() <= 4 for l in cache.layers)


def test_step_out_of_sequence_raises():
    from antkv_compile.backend import parse_options

    model = _model("llama")
    ids = _prompt(model)
    opts = dict(window=4, inner="eager")
    f = compiled(model, **opts)
    cache = StaticCache(config=model.config, max_cache_len=CAP)
    with torch.no_grad():
        f(input_ids=ids, past_key_values=cache)  # compiled prefill: the store holds 9 tokens
        for layer in cache.layers:
            layer.cumulative_length.add_(1)  # the next step writes position 10: position 9 skipped
        with pytest.raises(Exception, match="skipped or repeated"):
            f(input_ids=ids[:, :1], past_key_values=cache)
        # no store for this cache, and its dense buffers were released after the compiled prefill: nothing to
        # re-home from
        cache = StaticCache(config=model.config, max_cache_len=CAP)
        f(input_ids=ids, past_key_values=cache)
        session_for(*parse_options(opts)[:2]).stores.clear()
        with pytest.raises(Exception, match="compile the whole model"):
            f(input_ids=ids[:, :1], past_key_values=cache)


# ----------------------------------------------------------------------------------------- memory
def test_memory_after_prefill_is_codes_anchors_window():
    model = _model("llama", num_hidden_layers=2)
    cap = 256
    ids = torch.randint(3, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    opts = dict(anchor_ratio=0.01, window=16, inner="eager")
    dense = StaticCache(config=model.config, max_cache_len=cap)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=dense)
    dense_bytes = sum(t.untyped_storage().nbytes() for l in dense.layers for t in (l.keys, l.values))
    cache = StaticCache(config=model.config, max_cache_len=cap)
    with torch.no_grad():
        compiled(model, **opts)(input_ids=ids, past_key_values=cache)
    left = sum(t.untyped_storage().nbytes() for l in cache.layers for t in (l.keys, l.values))
    from antkv_compile.backend import parse_options

    cfg, art, _, _ = parse_options(opts)
    mem = session_for(cfg, art).memory_bytes()
    ours = mem["codes"] + mem["anchors"] + mem["window_kv"] + mem["window_queries"]
    assert left <= 4 * 2 * len(cache.layers)
    assert dense_bytes == 2 * 2 * 2 * cap * 16 * 4  # layers x (k, v) x heads x cap x D x fp32
    # 2 layers, 200 tokens, cap 256, fp32: dense 131072 B; codes 4096 + anchors 1632 + window (<= 8 tokens
    # of K/V + their queries) ~10 KB; the learned codebooks (~70 KB here) do not scale with length
    assert ours < dense_bytes / 4, (mem, dense_bytes)
    # the codebooks count each storage the session and its stores hold once (an earlier version counted deep
    # copies, whose freed addresses made the figure change from run to run)
    session = session_for(cfg, art)
    held = [t for pair in session.codebooks.values() for cb in pair for t in cb.tensors()]
    for s in session.stores.values():
        held += [t for cb in (s.cb_k, s.cb_v) for t in cb.tensors()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    assert all(session.memory_bytes()["codebooks"] == sum(storages.values()) for _ in range(3))
