"""`backend="antkv"` through Hugging Face `generate(..., cache_implementation="static")` on the CPU.

Two ways in: `model.compile(backend="antkv")` (prefill and decode both compiled) and
`generate(compile_config=CompileConfig(backend="antkv"))`, where transformers runs the prompt *uncompiled* and
only the decode steps through the compiled forward: the first compiled step then re-homes the eagerly written
prefix from the dense StaticCache into the antkv store (`Session._rehome_prefix`).

On a CPU, transformers only compiles in `generate` when `compile_config._compile_all_devices` is set (its testing
flag), and `CompileConfig`'s default `mode="reduce-overhead"` must be set to None to pass `options` (torch.compile
takes one or the other).
"""
import time

import pytest
import torch
from transformers import CompileConfig

from antkv_compile.backend import last_compiles, parse_options
from antkv_compile.models import tiny_model
from antkv_compile.runtime.state import Session, session_for


def _prompt(n, seed=1):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile_config(options=None):
    cc = CompileConfig(backend="antkv", mode=None, options=options) if options else CompileConfig(backend="antkv")
    cc._compile_all_devices = True  # transformers' flag to compile inside generate on a CPU
    return cc


@pytest.fixture
def rehomes(monkeypatch):
    """Counts the prefix re-homings (layer, position) done by the compiled model."""
    calls = []
    real = Session._rehome_prefix

    def spy(self, layer, q, k, start, capacity, scale):
        store = real(self, layer, q, k, start, capacity, scale)
        calls.append((layer, start, store is not None))
        return store

    monkeypatch.setattr(Session, "_rehome_prefix", spy)
    return calls


def _generate_compile_config(options, n_prompt=9, new=6, **kw):
    torch._dynamo.reset()
    ids = _prompt(n_prompt)
    ref = tiny_model("llama").generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static")
    model = tiny_model("llama")
    last_compiles.clear()  # a bounded log shared by the whole session
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static",
                         compile_config=_compile_config(options), return_dict_in_generate=True, **kw)
    return ref, out, list(last_compiles), time.perf_counter() - t0


def test_generate_through_model_compile_equals_uncompiled_at_full_anchors():
    torch._dynamo.reset()
    ids = _prompt(9)
    ref = tiny_model("llama").generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    model = tiny_model("llama")
    model.compile(backend="antkv", options={"anchor_ratio": 1.0, "window": 4})
    last_compiles.clear()  # a bounded log shared by the whole session
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert out.tolist() == ref.tolist()
    new = list(last_compiles)
    assert len(new) == 2 and all(r["after"] is not None for r in new)  # prefill + decode, both rewritten


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_generate_compile_config_eager_prefill_equals_uncompiled_at_full_anchors(inner, rehomes):
    """HF prefills eagerly; the first compiled decode step re-homes the 9-token prefix (window 4: it is flushed
    in that step, every token an anchor at ratio 1.0). Tokens equal the uncompiled model's. inner='inductor'
    runs the rewritten decode graph through real Inductor (~10 s here)."""
    opts = {"anchor_ratio": 1.0, "window": 4, "inner": inner}
    ref, out, records, _ = _generate_compile_config(opts)
    assert out.sequences.tolist() == ref.tolist()
    n_layers = tiny_model("llama").config.num_hidden_layers
    assert sorted(rehomes) == [(layer, 9, True) for layer in range(n_layers)]  # once per layer, at position 9
    # decode graphs only: the first step (dense buffers still allocated) and the later ones (released)
    assert 1 <= len(records) <= 2 and all(r["after"] is not None for r in records)
    cache = out.past_key_values
    assert all(l.keys.untyped_storage().nbytes() <= 4 for l in cache.layers)  # dense K/V released
    stores = session_for(*parse_options(opts)[:2]).stores.values()
    ours = [s for s in stores if len(s) == 9 + 6 - 1]
    assert len(ours) >= n_layers and all(s.n_coded > 0 and s.num_anchors == s.n_coded for s in ours)


def test_generate_compile_config_default_options_quantizes_a_rehomed_prefix(rehomes):
    """`CompileConfig(backend="antkv")` as is (mode "reduce-overhead", default options: 1-bit, 1% anchors,
    window 64, Inductor). An 80-token prompt is longer than the window, so the first compiled step flushes the
    re-homed prefix into codes (codebooks learned from it) and anchors scored by that step's queries."""
    ref, out, records, _ = _generate_compile_config(None, n_prompt=80, new=4)
    assert out.sequences.shape == ref.shape == (1, 84)
    assert {start for _, start, ok in rehomes if ok} == {80}
    assert 1 <= len(records) <= 2 and all(r["after"] is not None for r in records)
    stores = [s for s in session_for(*parse_options(None)[:2]).stores.values() if len(s) == 83]
    assert stores and all(s.n_coded == 80 + 1 - 32 and s.num_anchors == 1 for s in stores)


def test_generate_compile_config_chunked_prefill_compiles_the_prompt(rehomes):
    """transformers' supported way to run the prompt through the compiled forward too: `prefill_chunk_size`
    (one chunk here). Then the store sees the prompt's own queries and nothing is re-homed."""
    opts = {"anchor_ratio": 1.0, "window": 4, "inner": "eager"}
    ref, out, records, _ = _generate_compile_config(opts, prefill_chunk_size=16)
    assert out.sequences.tolist() == ref.tolist()
    assert rehomes == []
    assert len(records) == 2 and all(r["after"] is not None for r in records)  # prefill + decode


@pytest.mark.parametrize("kind", ["reference", "kernels"])
def test_rehomed_prefix_is_scored_by_the_first_compiled_steps_queries(kind):
    """The documented policy, on the method core's store and on the kernel-driven store (CPU references of the
    antkv:: ops): a re-homed prefix enters the window without queries; at its flush (in the first compiled step
    here) its anchors are the top Anchor Scores over that step's queries alone, and that step's attention output
    is exact."""
    from antkv_compile.config import AnTKVConfig
    from antkv_compile.numerics.anchor_score import anchor_scores
    from antkv_compile.numerics.attention import exact_attention
    from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
    from antkv_compile.numerics.vq import random_codebook
    from antkv_compile.runtime.state import _seed_window

    g = torch.Generator().manual_seed(0)
    b, hkv, hq, d, n, scale = 1, 2, 4, 16, 20, 0.25
    cfg = AnTKVConfig(bits="1", anchor_ratio=0.25, window=8, flush=4)
    cbk, cbv = (random_codebook(cfg.preset, hkv, d, generator=g, scale=0.3) for _ in range(2))
    from antkv_compile.runtime.kernel_store import KernelLayerStore

    cls = AnTKVLayerStore if kind == "reference" else KernelLayerStore
    store = cls(StoreGeometry(b, hkv, d, 64, torch.float32, torch.device("cpu"), scale), cbk, cbv, cfg)
    kp, vp = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    q, k, v = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
    _seed_window(store, q, kp, vp)
    assert len(store) == n and store.n_coded == 0
    out = store.attend(q, k, v)
    keys, values = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
    ref_out, ref_lse = exact_attention(q, keys, values, scale)
    torch.testing.assert_close(out, ref_out)  # nothing coded before the flush: exact
    flushed = n + 1 - (cfg.window - cfg.flush_size)
    assert store.n_coded == flushed
    _, k_hat = cbk.quantize(kp[:, :, :flushed])
    _, v_hat = cbv.quantize(vp[:, :, :flushed])
    scores = anchor_scores(q, kp[:, :, :flushed], vp[:, :, :flushed], ref_out, ref_lse, scale, kind="ans",
                           k_hat=k_hat, v_hat=v_hat)
    keep = cfg.anchors_for(flushed)
    want = scores.topk(keep, dim=2).indices.sort(dim=2).values
    got = store.anchor_pos[:, :, :keep].long().sort(dim=2).values
    assert torch.equal(got, want)
    torch.testing.assert_close(store.anchor_score[:, :, :keep].sort(dim=2).values,
                               scores.topk(keep, dim=2).values.sort(dim=2).values)


@pytest.mark.slow
def test_smollm2_generate_through_model_compile_equals_uncompiled_at_full_anchors(smollm2):
    """SmolLM2-135M-Instruct, `model.compile(backend="antkv", options={"anchor_ratio": 1.0, ...})` +
    `generate(cache_implementation="static", max_new_tokens=8, do_sample=False)`: the same tokens as uncompiled.

    options['inner'] = 'eager': the rewritten graphs run without Inductor (Inductor compiling two 30-layer graphs
    takes minutes on 2 CPU cores; Dynamo tracing alone is most of this test's ~40 s). Random codebooks (coarse, the
    same for every layer seed) replace learned ones to skip k-means: at ratio 1.0 every flushed token is an anchor,
    so the codebooks cannot change the result; window 4 makes the prompt's tokens flushed and anchored."""
    from test_backend import random_artifact

    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is a KV cache?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    torch._dynamo.reset()
    model.compile(backend="antkv", options={"anchor_ratio": 1.0, "window": 4, "inner": "eager",
                                            "artifact": random_artifact(model)})
    last_compiles.clear()
    try:
        out = model.generate(ids, **kw)
    finally:
        model._compiled_call_impl = None  # the fixture's model is shared: undo model.compile
        torch._dynamo.reset()
    assert out.tolist() == ref.tolist()
    assert len(last_compiles) == 2 and all(r["after"] is not None for r in last_compiles)  # prefill + decode
