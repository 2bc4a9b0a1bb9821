"""The kernel-driven layer store equals the reference store (CPU: the antkv ops run their references)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import AnTKVConfig, get_preset
from antkv_compile.numerics.attention import causal_mask, exact_attention
from antkv_compile.numerics.store import AnTKVLayerStore, CacheOverflowError, StoreGeometry
from antkv_compile.numerics.rope import InvFreqRope
from antkv_compile.numerics.rope_pairs import pair_transform
from antkv_compile.numerics.vq import Codebook
from antkv_compile.runtime.kernel_store import KernelLayerStore, kernels_support
from numerics_helpers import codebook_with_transform, randn

D = 16


def _pair(batch, kv_heads, capacity, **cfg):
    geom = StoreGeometry(batch, kv_heads, D, capacity, torch.float32, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(**{"bits": "1", "window": 8, **cfg})
    cbk = codebook_with_transform(config.bits, kv_heads, D, 1)
    cbv = codebook_with_transform(config.bits, kv_heads, D, 2)
    return AnTKVLayerStore(geom, cbk, cbv, config), KernelLayerStore(geom, cbk, cbv, config)


def _run(store, q, k, v, prefill):
    outs = [store.attend(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])] if prefill else []
    for t in range(prefill, k.shape[2]):
        outs.append(store.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
    return torch.cat(outs, dim=2)


@settings(max_examples=10, deadline=None)
@given(prefill=st.integers(0, 40), n=st.integers(1, 60), batch=st.integers(1, 2), group=st.sampled_from([1, 3, 8]),
       ratio=st.sampled_from([0.0, 0.05, 0.3]), score=st.sampled_from(["ans", "sensitivity", "attention"]),
       window=st.integers(1, 9), seed=st.integers(0, 999))
def test_kernel_store_equals_reference_store(prefill, n, batch, group, ratio, score, window, seed):
    """Same outputs step by step, same codes, same anchors: prefills long enough to take the chunk path
    (G * T > 64) and decode steps through the decode op, across several flushes."""
    prefill = min(prefill, n)
    ref, ker = _pair(batch, 2, 80, anchor_ratio=ratio, score=score, window=window)
    q = randn(batch, 2 * group, n, D, seed=seed)
    k, v = randn(batch, 2, n, D, seed=seed + 1), randn(batch, 2, n, D, seed=seed + 2)
    torch.testing.assert_close(_run(ker, q, k, v, prefill), _run(ref, q, k, v, prefill), atol=2e-5, rtol=2e-5)
    assert ker.n_coded == ref.n_coded and int(ker.n_coded_t[0]) == ref.n_coded
    assert torch.equal(ker.codes_k[:, :, :ker.n_coded], ref.codes_k[:, :, :ref.n_coded])
    assert torch.equal(ker.codes_v[:, :, :ker.n_coded], ref.codes_v[:, :, :ref.n_coded])
    assert torch.equal(ker.anchor_pos.sort(dim=2).values, ref.anchor_pos.sort(dim=2).values)


def _chunks_then_steps(store, q, k, v):
    """Three long chunks (0-40, 40-90, 90-110) over a growing coded prefix, then one token at a time to the end."""
    n = q.shape[2]
    o = [store.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 40), (40, 90), (90, 110))]
    o += [store.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(110, n)]
    return torch.cat(o, dim=2)


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_chunked_prefill_over_a_coded_prefix_equals_reference(ratio):
    """Long chunks after the store holds codes and anchors (the prefix path: codes decoded, anchors
    restored, window), then decode steps; up to the full capacity."""
    ref, ker = _pair(1, 2, 120, anchor_ratio=ratio, window=8)
    n = 120
    q = randn(1, 16, n, D, seed=7)
    k, v = randn(1, 2, n, D, seed=8), randn(1, 2, n, D, seed=9)
    outs = {name: _chunks_then_steps(s, q, k, v) for name, s in (("ref", ref), ("ker", ker))}
    torch.testing.assert_close(outs["ker"], outs["ref"], atol=2e-5, rtol=2e-5)
    assert ker.num_anchors == ref.num_anchors


def test_fill_with_every_token_anchored_then_decode_is_exact():
    """fill() appends through the encode path; with anchor ratio 1.0 every flushed token is an anchor, so a
    decode step after it must equal exact attention over all tokens."""
    _, ker = _pair(1, 2, 300, anchor_ratio=1.0, window=16)
    n = 200
    q = randn(1, 6, n + 1, D, seed=3)
    k, v = randn(1, 2, n + 1, D, seed=4), randn(1, 2, n + 1, D, seed=5)
    for lo in range(0, n, 64):
        ker.fill(q[:, :, lo:min(n, lo + 64)], k[:, :, lo:min(n, lo + 64)], v[:, :, lo:min(n, lo + 64)])
    assert len(ker) == n and ker.num_anchors == ker.n_coded > 0
    out = ker.attend(q[:, :, n:], k[:, :, n:], v[:, :, n:])
    pos = torch.arange(n + 1)
    want = exact_attention(q, k, v, 0.25, causal_mask(pos, pos))[0][:, :, n:]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_fill_keeps_the_anchor_budget():
    _, ker = _pair(2, 2, 1000, anchor_ratio=0.02, window=32)
    q, k, v = randn(2, 4, 900, D, seed=1), randn(2, 2, 900, D, seed=2), randn(2, 2, 900, D, seed=3)
    for lo in range(0, 900, 300):
        ker.fill(q[:, :, lo:lo + 300], k[:, :, lo:lo + 300], v[:, :, lo:lo + 300])
    assert ker.n_coded == 900 - 16 and len(ker) == 900
    valid = (ker.anchor_pos >= 0).sum(dim=2)
    assert bool((valid == math.ceil(0.02 * ker.n_coded)).all())
    assert bool((ker.anchor_pos[ker.anchor_pos >= 0] < ker.n_coded).all())


def test_window_lives_in_its_buffers():
    """Decode steps write their token into the window buffers in place (no copy of the window per step), across
    flushes; a chunk longer than the window grows the buffers and the next flush shrinks them back; the memory
    the window holds is the buffers' (window tokens), and the store still equals the reference store."""
    ref, ker = _pair(1, 2, 200, anchor_ratio=0.1, window=8, flush=3)
    n = 150
    q = randn(1, 6, n, D, seed=11)
    k, v = randn(1, 2, n, D, seed=12), randn(1, 2, n, D, seed=13)
    outs = {"ref": [], "ker": []}
    for name, s in (("ref", ref), ("ker", ker)):
        outs[name].append(s.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30]))  # a chunk: 30 > window
        for t in range(30, n):
            outs[name].append(s.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
            if name == "ker":
                if t == 30:
                    ptrs = {a: buf.data_ptr() for a, buf in ker._slabs.items()}
                assert {a: buf.data_ptr() for a, buf in ker._slabs.items()} == ptrs  # in place
                assert all(buf.shape[2] == 8 for buf in ker._slabs.values())
                assert ker.win_k.data_ptr() == ker._slabs["win_k"].data_ptr() and ker.n_window < 8
    torch.testing.assert_close(torch.cat(outs["ker"], 2), torch.cat(outs["ref"], 2), atol=2e-5, rtol=2e-5)
    assert torch.equal(ker.win_k, ref.win_k) and torch.equal(ker.win_q, ref.win_q)
    bytes_kv = sum(b.untyped_storage().nbytes() for a, b in ker._slabs.items() if a in ("win_k", "win_v"))
    assert bytes_kv == 2 * 1 * 2 * 8 * D * 4  # K and V: batch 1, 2 heads, 8 tokens, fp32


def test_row_sampled_scores_reach_both_stores_alike():
    """score_row_stride / score_band go to the flush's scorer in both stores: the kernel store equals the reference
    store with the same sampling, and the sampling changes the anchor scores of a chunk longer than the band."""
    cfg = dict(anchor_ratio=0.2, window=8, score_row_stride=2, score_band=4)
    ref, ker = _pair(1, 2, 80, **cfg)
    exact, _ = _pair(1, 2, 80, **{**cfg, "score_row_stride": 1})
    q = randn(1, 6, 60, D, seed=21)
    k, v = randn(1, 2, 60, D, seed=22), randn(1, 2, 60, D, seed=23)
    outs = [_run(s, q, k, v, prefill=40) for s in (ref, ker, exact)]
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ker.anchor_score, ref.anchor_score, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref.anchor_score, exact.anchor_score)
    assert AnTKVConfig().row_stride_for(4) == 4 and AnTKVConfig(score_row_stride=1).row_stride_for(4) == 1
    with pytest.raises(ValueError, match="score_row_stride"):
        AnTKVConfig(score_row_stride=0)


def test_decode_scratch_is_shared_by_the_stores_and_freed_with_the_last():
    """The stores of a device share one decode workspace, which does not outlive them (a long-context run
    once left its large split scratch allocated for the next run of the process)."""
    import gc

    from antkv_compile.runtime import kernel_store

    _, a = _pair(1, 2, 20)
    _, b = _pair(1, 2, 20)
    assert a._workspace is b._workspace
    a._workspace["po"] = torch.empty(8)
    del a, b
    gc.collect()
    assert "cpu" not in kernel_store._WORKSPACES


def test_overflow_and_unsupported_configs_are_refused():
    _, ker = _pair(1, 2, 20)
    with pytest.raises(CacheOverflowError, match="larger cache"):
        ker.attend(randn(1, 2, 21, D), randn(1, 2, 21, D), randn(1, 2, 21, D))
    assert kernels_support(AnTKVConfig(coded_path="dequantized")) is not None  # post-RoPE decoded shadow
    assert kernels_support(AnTKVConfig(key_space="pre_rope", coded_path="dequantized")) is None  # pair layout
    assert kernels_support(AnTKVConfig()) is None


# ------------------------------------------------------------------------------------- pre-RoPE keys (pair layout)
def _rope_pair(batch, kv_heads, capacity, *, d=D, bits="1", stages=1, shared=False, theta=50.0, scaling=1.0,
               seed=0, **cfg):
    """A reference store and a kernel store over one pre-RoPE key codebook in the RoPE-pair layout (random pair
    order per head, random centroids and mean) and a plain value codebook; RoPE from stored frequencies."""
    geom = StoreGeometry(batch, kv_heads, d, capacity, torch.float32, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(**{"bits": bits, "window": 8, "key_space": "pre_rope", "coded_path": "dequantized", **cfg})
    gen = torch.Generator().manual_seed(seed)
    h = 1 if shared else kv_heads
    tr, inv = pair_transform(torch.stack([torch.randperm(d // 2, generator=gen) for _ in range(h)]))
    p = get_preset(bits)
    cents = torch.randn(stages, h, d // p.sub_dim, p.num_centroids, p.sub_dim, generator=gen)
    cents = cents * torch.tensor([0.5**i for i in range(stages)])[:, None, None, None, None]
    cbk = Codebook(cents, tr, inv, 0.3 * torch.randn(h, d, generator=gen))
    cbv = codebook_with_transform(bits, kv_heads, d, seed + 2)
    rope = InvFreqRope(1.0 / theta ** (torch.arange(0, d, 2).float() / d), scaling)
    return (AnTKVLayerStore(geom, cbk, cbv, config, rope=rope),
            KernelLayerStore(geom, cbk, cbv, config, rope=rope))


def _float_numels(store) -> dict[str, int]:
    """Elements of each float tensor the store holds (dicts of tensors summed under their attribute's name)."""
    out = {}
    for name, t in vars(store).items():
        for x in (t.values() if isinstance(t, dict) else t if isinstance(t, (list, tuple)) else [t]):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                out[name] = out.get(name, 0) + x.numel()
    return out


def test_pre_rope_kernel_store_keeps_no_decoded_copy():
    """No float buffer of the pre-RoPE kernel store grows with capacity x head_dim (a decoded or fp32 shadow of the
    cache): only the codes (uint8), the anchor bitmask and the anchors (here none) grow with capacity."""
    small = _rope_pair(1, 2, 64, anchor_ratio=0.0)[1]
    large = _rope_pair(1, 2, 4096, anchor_ratio=0.0)[1]
    a, b = _float_numels(small), _float_numels(large)
    grown = {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0) >= (4096 - 64) * D}
    assert grown == {} and not hasattr(large, "k_hat") and not hasattr(large, "v_hat")


@settings(max_examples=8, deadline=None)
@given(prefill=st.integers(0, 40), n=st.integers(1, 60), batch=st.integers(1, 2), group=st.sampled_from([1, 3, 4]),
       ratio=st.sampled_from([0.0, 0.05, 0.3]), score=st.sampled_from(["ans", "sensitivity"]),
       window=st.integers(2, 9), bits=st.sampled_from(["1", "2", "0.375"]), stages=st.sampled_from([1, 2]),
       shared=st.booleans(), scaling=st.sampled_from([1.0, 1.3]), seed=st.integers(0, 999))
def test_pre_rope_kernel_store_equals_reference_store(prefill, n, batch, group, ratio, score, window, bits, stages,
                                                      shared, scaling, seed):
    """Pre-RoPE pair-layout keys: same outputs step by step (decode through antkv::rope_decode_attention, long
    chunks over the decoded + rotated prefix), same codes (the flush unrotates by slot before the encode), same
    anchors (scores over the rotated residual), across several flushes."""
    prefill = min(prefill, n)
    ref, ker = _rope_pair(batch, 2, 80, bits=bits, stages=stages, shared=shared, scaling=scaling, seed=seed,
                          anchor_ratio=ratio, score=score, window=window)
    assert ker.pre_rope
    q = randn(batch, 2 * group, n, D, seed=seed)
    k, v = randn(batch, 2, n, D, seed=seed + 1), randn(batch, 2, n, D, seed=seed + 2)
    torch.testing.assert_close(_run(ker, q, k, v, prefill), _run(ref, q, k, v, prefill), atol=2e-5, rtol=2e-5)
    assert ker.n_coded == ref.n_coded and int(ker.n_coded_t[0]) == ref.n_coded
    assert torch.equal(ker.codes_k[:, :, :ker.n_coded], ref.codes_k[:, :, :ref.n_coded])
    assert torch.equal(ker.codes_v[:, :, :ker.n_coded], ref.codes_v[:, :, :ref.n_coded])
    assert torch.equal(ker.anchor_pos.sort(dim=2).values, ref.anchor_pos.sort(dim=2).values)


def test_pre_rope_chunks_over_a_coded_prefix_and_fill_then_exact_decode():
    """Long chunks after the store holds pre-RoPE codes (prefix decoded and rotated by slot), then decode steps; and a
    store filled with every token anchored decodes exactly (the rotation of codes is never seen by an anchor)."""
    ref, ker = _rope_pair(1, 2, 120, anchor_ratio=0.1, window=8, seed=3)
    n = 120
    q = randn(1, 8, n, D, seed=7)
    k, v = randn(1, 2, n, D, seed=8), randn(1, 2, n, D, seed=9)
    outs = {name: _chunks_then_steps(s, q, k, v) for name, s in (("ref", ref), ("ker", ker))}
    torch.testing.assert_close(outs["ker"], outs["ref"], atol=2e-5, rtol=2e-5)
    assert ker.num_anchors == ref.num_anchors
    _, full = _rope_pair(1, 2, 300, anchor_ratio=1.0, window=16, seed=4)
    q, k, v = randn(1, 6, 201, D, seed=3), randn(1, 2, 201, D, seed=4), randn(1, 2, 201, D, seed=5)
    for lo in range(0, 200, 64):
        full.fill(q[:, :, lo:min(200, lo + 64)], k[:, :, lo:min(200, lo + 64)], v[:, :, lo:min(200, lo + 64)])
    out = full.attend(q[:, :, 200:], k[:, :, 200:], v[:, :, 200:])
    pos = torch.arange(201)
    torch.testing.assert_close(out, exact_attention(q, k, v, 0.25, causal_mask(pos, pos))[0][:, :, 200:],
                               atol=1e-5, rtol=1e-5)


def test_pre_rope_kernel_store_refuses_a_dense_key_map():
    """A pre-RoPE key codebook whose map mixes RoPE pairs cannot be decoded in-kernel: refused at construction."""
    geom = StoreGeometry(1, 2, D, 40, torch.float32, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(key_space="pre_rope", coded_path="dequantized")
    rope = InvFreqRope(1.0 / 50.0 ** (torch.arange(0, D, 2).float() / D))
    cb = codebook_with_transform("1", 2, D, 1)
    with pytest.raises(ValueError, match="pair layout|RoPE-pair"):
        KernelLayerStore(geom, cb, cb, config, rope=rope)


# ------------------------------------------------------------------------------------- through the backend
def _greedy_manual(fn, model, ids, steps, cap):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cap)
    logits = []
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        for i in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1].float())
            pos = torch.tensor([ids.shape[1] + i])
            out = fn(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=pos,
                     position_ids=pos[None])
    return torch.cat(logits)


def test_backend_kernel_store_equals_reference_store_and_capacity_beyond_the_static_cache():
    """options store='kernels' (the antkv ops; their CPU references here) gives the reference store's
    logits; options capacity=N lets a 16-slot static cache serve 22 positions (dense cache never read)."""
    from test_backend import compiled, random_artifact

    from antkv_compile.backend import last_compiles
    from antkv_compile.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    art = random_artifact(model)
    base = dict(anchor_ratio=0.1, window=4, artifact=art, inner="eager")
    ref = _greedy_manual(compiled(model, store="reference", **base), model, ids, 10, 24)
    ker = _greedy_manual(compiled(model, store="kernels", **base), model, ids, 10, 24)
    torch.testing.assert_close(ker, ref, atol=1e-4, rtol=1e-4)
    kstores = list(last_compiles[-1]["session"].stores.values())
    assert type(kstores[0]).__name__ == "KernelLayerStore"
    # through the compiled graph too, the window stays in its buffers (the op does not copy it out each step)
    assert all(s.win_k.data_ptr() == s._slabs["win_k"].data_ptr() and s.win_q.data_ptr() == s._slabs["win_q"].data_ptr()
               for s in kstores)
    small = _greedy_manual(compiled(model, store="kernels", capacity=24, **base), model, ids, 10, 16)
    torch.testing.assert_close(small, ker, atol=1e-4, rtol=1e-4)
    stores = list(last_compiles[-1]["session"].stores.values())
    assert stores and all(s.geom.capacity == 24 and len(s) == 12 + 10 for s in stores)


def test_backend_pre_rope_kernel_store_equals_reference_store():
    """A pre-RoPE artifact in the RoPE-pair layout through the compiled model: options store='kernels' (the rope decode
    op, the flush with unrotation; their CPU references here) gives the reference store's logits."""
    from test_backend import compiled

    from antkv_compile.artifact import CodebookArtifact
    from antkv_compile.backend import last_compiles
    from antkv_compile.models import kv_geometry, tiny_model
    from antkv_compile.numerics.rope import model_rope_parameters
    from antkv_compile.numerics.vq import random_codebook

    model = tiny_model("llama")
    g = kv_geometry(model.config)
    p = get_preset("1")
    gen = torch.Generator().manual_seed(0)
    keys, values = [], []
    for _ in range(g.num_layers):
        tr, inv = pair_transform(torch.stack([torch.randperm(g.head_dim // 2, generator=gen)
                                              for _ in range(g.num_kv_heads)]))
        cents = 0.3 * torch.randn(1, g.num_kv_heads, g.head_dim // p.sub_dim, p.num_centroids, p.sub_dim,
                                  generator=gen)
        keys.append(Codebook(cents, tr, inv, 0.1 * torch.randn(g.num_kv_heads, g.head_dim, generator=gen)))
        values.append(random_codebook(p, g.num_kv_heads, g.head_dim, generator=gen, scale=0.3))
    inv_freq, scaling = model_rope_parameters(model)
    manifest = {"preset": {"name": p.name, "sub_dim": p.sub_dim, "code_bits": p.code_bits, "stages": p.stages},
                "tensors_sha256": "random-pre-rope-pairs", "model": {}, "key_space": "pre_rope",
                "rope": {"attention_scaling": scaling}}
    art = CodebookArtifact(keys, values, manifest, inv_freq)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    base = dict(anchor_ratio=0.1, window=4, artifact=art, inner="eager")
    ref = _greedy_manual(compiled(model, store="reference", **base), model, ids, 10, 24)
    ker = _greedy_manual(compiled(model, store="kernels", **base), model, ids, 10, 24)
    torch.testing.assert_close(ker, ref, atol=1e-4, rtol=1e-4)
    stores = list(last_compiles[-1]["session"].stores.values())
    assert stores and all(type(s).__name__ == "KernelLayerStore" and s.pre_rope and s.n_coded > 0 for s in stores)


def test_store_whose_cache_identity_died_is_adopted_by_the_next_step_of_the_same_length():
    """transformers 5.17 on CUDA hands the prefill graph a cache-length tensor that dies after the call (seen on
    the H100): the store must survive as the layer's orphan and be adopted by the next step at its length;
    a step at another length must not adopt it, and a new prompt frees it."""
    import gc

    from antkv_compile.runtime.state import Session, StoreStateError

    s = Session(999, AnTKVConfig(window=4))
    q, k, v = randn(1, 4, 6, D, seed=1), randn(1, 2, 6, D, seed=2), randn(1, 2, 6, D, seed=3)
    ident = torch.zeros(1)
    s.bind(0, ident)
    store = s.store_for(0, q, k, v, 0, 32, 0.25)
    store.attend(q, k, v)
    del ident
    gc.collect()
    assert not s.stores and len(s.orphans[0]) == 6
    other = torch.zeros(1)
    s.bind(0, other)
    with pytest.raises(StoreStateError):
        s.store_for(0, q[:, :, :1], k[:, :, :1], v[:, :, :1], 5, 32, 0.25)  # wrong length: not adopted
    assert s.store_for(0, q[:, :, :1], k[:, :, :1], v[:, :, :1], 6, 32, 0.25) is store
    assert not s.orphans
    ident2 = torch.zeros(1)
    s.bind(0, ident2)
    del ident2
    gc.collect()
    s.bind(0, other)
    fresh = s.store_for(0, q, k, v, 0, 32, 0.25)  # a new prompt: the orphan (if any) is freed
    assert fresh is not store and not s.orphans
