import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import AnTKVConfig
from antkv_compile.numerics.attention import causal_mask, exact_attention
from antkv_compile.numerics.store import (
    AnTKVLayerStore,
    CacheInputError,
    CacheOverflowError,
    StoreGeometry,
)
from numerics_helpers import codebook_with_transform, randn

D = 16


def _store(batch=1, kv_heads=2, capacity=80, dtype=torch.float32, **cfg):
    geom = StoreGeometry(batch, kv_heads, D, capacity, dtype, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(**{"bits": "1", "window": 8, **cfg})
    return AnTKVLayerStore(geom, codebook_with_transform(config.bits, kv_heads, D, 1),
                           codebook_with_transform(config.bits, kv_heads, D, 2), config)


def _run(store, q, k, v, prefill):
    outs = [store.attend(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])] if prefill else []
    for t in range(prefill, k.shape[2]):
        outs.append(store.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
    return torch.cat(outs, dim=2)


def _reference(store, q, k, v):
    """What the store must compute at every step: the tokens' state when each query arrived."""
    n = k.shape[2]
    return exact_attention(q, k, v, store.geom.scale, causal_mask(torch.arange(n), torch.arange(n)))[0]


@settings(max_examples=12, deadline=None)
@given(prefill=st.integers(0, 30), n=st.integers(1, 50), batch=st.integers(1, 2), group=st.integers(1, 3),
       window=st.integers(1, 9), seed=st.integers(0, 999))
def test_anchor_ratio_one_keeps_everything_exact(prefill, n, batch, group, window, seed):
    prefill = min(prefill, n)
    s = _store(batch=batch, anchor_ratio=1.0, window=window)
    q = randn(batch, 2 * group, n, D, seed=seed)
    k, v = randn(batch, 2, n, D, seed=seed + 1), randn(batch, 2, n, D, seed=seed + 2)
    torch.testing.assert_close(_run(s, q, k, v, prefill), _reference(s, q, k, v), atol=1e-5, rtol=1e-5)
    assert s.num_anchors == s.n_coded


@settings(max_examples=10, deadline=None)
@given(prefill=st.integers(0, 30), n=st.integers(1, 60), ratio=st.sampled_from([0.0, 0.05, 0.2]),
       score=st.sampled_from(["ans", "sensitivity", "attention", "random"]), window=st.integers(1, 9),
       path=st.sampled_from(["lut", "dequantized"]), seed=st.integers(0, 999))
def test_prefill_and_decode_equal_the_reference_built_from_the_stores_own_state(prefill, n, ratio, score, window,
                                                                                path, seed):
    """At every step, the output equals exact attention over (dequantized non-anchors, exact anchors,
    exact window): replay the store's history and check step by step."""
    prefill = min(prefill, n)
    s = _store(anchor_ratio=ratio, score=score, window=window, coded_path=path)
    q = randn(1, 4, n, D, seed=seed)
    k, v = randn(1, 2, n, D, seed=seed + 1), randn(1, 2, n, D, seed=seed + 2)
    steps = ([(0, prefill)] if prefill else []) + [(t, t + 1) for t in range(prefill, n)]
    for a, b in steps:
        # state before the step
        nc = s.n_coded
        k_seen = s.cb_k.decode(s.codes_k[:, :, :nc]).clone()
        v_seen = s.cb_v.decode(s.codes_v[:, :, :nc]).clone()
        for i in range(s.anchor_capacity):
            pos = s.anchor_pos[0, :, i]
            for h in range(2):
                if pos[h] >= 0:
                    k_seen[0, h, pos[h]] = s.anchor_k[0, h, i]
                    v_seen[0, h, pos[h]] = s.anchor_v[0, h, i]
        keys = torch.cat([k_seen, k[:, :, nc:b]], 2)
        vals = torch.cat([v_seen, v[:, :, nc:b]], 2)
        mask = causal_mask(torch.arange(a, b), torch.arange(b))
        ref = exact_attention(q[:, :, a:b], keys, vals, 0.25, mask)[0]
        out = s.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    expected_anchors = 0 if ratio == 0 else min(s.n_coded, math.ceil(ratio * s.n_coded))
    assert s.num_anchors == expected_anchors
    assert len(s) == n


def test_anchors_are_the_top_scoring_tokens_of_a_flush():
    s = _store(anchor_ratio=0.25, window=8, flush=8, score="attention")
    q = torch.zeros(1, 4, 8, D)
    k = torch.zeros(1, 2, 8, D)
    k[:, :, 5] = 5.0  # token 5 attracts nearly all attention of the later queries
    q[:, :, :] = 1.0
    s.attend(q, k, randn(1, 2, 8, D))
    assert s.n_coded == 8 and s.n_window == 0
    assert (s.anchor_pos[0, :, :2] == 5).any(dim=1).all()


@pytest.mark.parametrize("window, flush, prefill, decode", [(8, 4, 20, 0), (8, 4, 20, 7), (8, 8, 5, 9), (6, 1, 0, 13)])
def test_window_keeps_the_newest_tokens_exact(window, flush, prefill, decode):
    s = _store(window=window, flush=flush)
    if prefill:
        s.attend(randn(1, 4, prefill, D), randn(1, 2, prefill, D), randn(1, 2, prefill, D))
    for _ in range(decode):
        s.attend(randn(1, 4, 1, D), randn(1, 2, 1, D), randn(1, 2, 1, D))
    n = prefill + decode
    assert len(s) == n and s.n_window < window
    expected = 0
    for arrived in ([prefill] if prefill else []) + [1] * decode:
        expected += arrived
        if expected >= window:
            expected = window - flush  # the oldest tokens are flushed, the newest stay exact
    assert s.n_window == expected


def test_overflow_is_refused_with_advice():
    s = _store(capacity=10)
    s.attend(randn(1, 4, 10, D), randn(1, 2, 10, D), randn(1, 2, 10, D))
    with pytest.raises(CacheOverflowError, match="allocate a larger cache"):
        s.attend(randn(1, 4, 1, D), randn(1, 2, 1, D), randn(1, 2, 1, D))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k: k.to(torch.float64), "built for torch.float32"),
        (lambda k: k[:, :1], "expects"),
        (lambda k: k[..., :8], "head_dim=16"),
        (lambda k: k.masked_fill(torch.rand_like(k) > 0.5, float("nan")), "NaN or Inf"),
        (lambda k: k.masked_fill(torch.rand_like(k) > 0.5, float("inf")), "NaN or Inf"),
    ],
)
def test_bad_keys_raise_clear_errors(change, message):
    s = _store()
    with pytest.raises(CacheInputError, match=message):
        s.attend(randn(1, 4, 3, D), change(randn(1, 2, 3, D)), randn(1, 2, 3, D))


def test_codebook_for_another_geometry_is_refused():
    geom = StoreGeometry(1, 3, D, 10, torch.float32, torch.device("cpu"), 0.25)
    with pytest.raises(CacheInputError, match="calibrated for this model"):
        AnTKVLayerStore(geom, codebook_with_transform("1", 2, D), codebook_with_transform("1", 2, D), AnTKVConfig())


def test_device_mismatch_is_refused():
    s = _store()
    meta = randn(1, 2, 3, D).to("meta")
    with pytest.raises(CacheInputError, match="one device"):
        s.attend(randn(1, 4, 3, D), meta, randn(1, 2, 3, D))


def test_memory_counts_codes_anchors_and_window():
    s = _store(capacity=64, anchor_ratio=0.1, window=8, flush=8)
    s.attend(randn(1, 4, 20, D), randn(1, 2, 20, D), randn(1, 2, 20, D))  # flushed: 20 coded
    s.attend(randn(1, 4, 3, D), randn(1, 2, 3, D), randn(1, 2, 3, D))  # 3 in the window
    bits = s.memory_bits()
    assert bits["codes"] == 2 * 20 * 2 * 16  # heads * tokens * (K + V) * (two 8-bit codes per 16-dim vector)
    # full precision counted at 16 bits; ceil(0.1 * 20) = 2 anchors per head, each with a 32-bit position
    assert bits["anchors"] == 2 * 2 * (2 * D * 16 + 32)
    assert bits["window"] == 2 * 3 * 2 * D * 16
