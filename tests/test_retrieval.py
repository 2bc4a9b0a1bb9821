"""The retrieval step (numerics/retrieval.py): exact at k = all, the plain coded store at k = 0, and in between
exact attention over (retrieved tokens and anchors in full precision, the other coded tokens decoded, the window)
with the retrieved tokens the top scorers of their codes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import AnTKVConfig
from antkv_compile.numerics.attention import causal_mask, exact_attention
from antkv_compile.numerics.retrieval import (
    RetrievalLayerStore,
    retrieve_count,
    scores_from_codes,
    scores_from_keys,
    summed_queries,
)
from antkv_compile.numerics.rope import InvFreqRope
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
from numerics_helpers import codebook_with_transform, randn
from test_rope_pair_keys import _pair_codebook

D, H = 16, 2


def _stores(kind, batch=1, capacity=96, window=8, **cfg):
    """(retrieval store, plain store) of one configuration: kind = lut | dequantized | pre_rope."""
    geom = StoreGeometry(batch, H, D, capacity, torch.float32, torch.device("cpu"), scale=0.25)
    rope = None
    cbk = codebook_with_transform("1", H, D, 1)
    extra = {}
    if kind == "pre_rope":
        rope = InvFreqRope(1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D)), attention_scaling=1.1)
        cbk = _pair_codebook("1", H, D, 1)
        extra = {"key_space": "pre_rope", "coded_path": "dequantized"}
    elif kind == "dequantized":
        extra = {"coded_path": "dequantized"}
    config = AnTKVConfig(bits="1", window=window, offload="host", **extra, **cfg)
    cbv = codebook_with_transform("1", H, D, 2)
    return (RetrievalLayerStore(geom, cbk, cbv, config, rope=rope), AnTKVLayerStore(geom, cbk, cbv, config, rope=rope))


def _steps(prefill, n):
    """A prefill, a chunk of 5 tokens over the coded prefix (where n allows), then one token at a time."""
    chunk = [(prefill, prefill + 5)] if n - prefill > 5 else []
    start = prefill + 5 if chunk else prefill
    return ([(0, prefill)] if prefill else []) + chunk + [(t, t + 1) for t in range(start, n)]


def _inputs(batch, group, n, seed):
    q = randn(batch, H * group, n, D, seed=seed)
    return q, randn(batch, H, n, D, seed=seed + 1), randn(batch, H, n, D, seed=seed + 2)


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["lut", "dequantized", "pre_rope"]), prefill=st.integers(0, 40), n=st.integers(1, 45),
       ratio=st.sampled_from([0.0, 0.1, 0.3]), batch=st.integers(1, 2), group=st.integers(1, 3),
       window=st.integers(1, 9), seed=st.integers(0, 999))
def test_retrieving_every_token_is_exact_attention_over_full_precision(kind, prefill, n, ratio, batch, group, window,
                                                                      seed):
    prefill = min(prefill, n)
    store, _ = _stores(kind, batch, window=window, anchor_ratio=ratio, retrieve_fraction=1.0, retrieve_min=0)
    q, k, v = _inputs(batch, group, n, seed)
    for a, b in _steps(prefill, n):
        candidates = store.n_coded - store.num_anchors
        ref = exact_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], 0.25,
                              causal_mask(torch.arange(a, b), torch.arange(b)))[0]
        torch.testing.assert_close(store.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]), ref, atol=2e-5, rtol=2e-5)
        # every candidate was retrieved (it is not the anchors doing the work)
        assert (0 if store.last_retrieved is None else store.last_retrieved.shape[-1]) == candidates


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["lut", "dequantized", "pre_rope"]), prefill=st.integers(0, 40), n=st.integers(1, 45),
       ratio=st.sampled_from([0.0, 0.1]), group=st.integers(1, 3), seed=st.integers(0, 999))
def test_retrieving_nothing_is_the_plain_coded_store(kind, prefill, n, ratio, group, seed):
    prefill = min(prefill, n)
    store, plain = _stores(kind, anchor_ratio=ratio, retrieve_fraction=0.0, retrieve_min=0)
    q, k, v = _inputs(1, group, n, seed)
    for a, b in _steps(prefill, n):
        args = (q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        torch.testing.assert_close(store.attend(*args), plain.attend(*args), atol=1e-6, rtol=1e-6)
        assert store.last_retrieved is None


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["lut", "dequantized", "pre_rope"]), prefill=st.integers(20, 60),
       fraction=st.sampled_from([0.05, 0.2, 0.5]), floor=st.integers(0, 6), ratio=st.sampled_from([0.0, 0.1]),
       group=st.integers(1, 3), seed=st.integers(0, 999))
def test_a_step_attends_retrieved_and_anchors_exactly_and_the_rest_on_codes_each_once(kind, prefill, fraction, floor,
                                                                                     ratio, group, seed):
    """Replay: build the keys/values each token is read as (full precision if retrieved or an anchor, decoded
    otherwise), attend exactly over them plus the window; and check the retrieved tokens are the top scorers
    (on the decoded keys, queries of the group summed) among the non-anchors, k of them."""
    store, _ = _stores(kind, window=8, anchor_ratio=ratio, retrieve_fraction=fraction, retrieve_min=floor)
    n = prefill + 7
    q, k, v = _inputs(1, group, n, seed)
    store.attend(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])
    for a, b in [(prefill, prefill + 5), (prefill + 5, prefill + 6), (prefill + 6, prefill + 7)]:
        nc = store.n_coded
        k_hat, v_hat = store.decode_coded(0, nc)
        is_anchor = store._anchor_mask()
        out = store.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        idx = store.last_retrieved
        kk = retrieve_count(nc, nc - int(is_anchor[0, 0].sum()), fraction, floor)
        assert kk == min(nc - int(is_anchor[0, 0].sum()), max(floor, math.ceil(fraction * nc)))
        if idx is not None and idx.dim() == 3:
            idx = idx[:, :, None]  # [B, Hkv, T, k]: each query token's own
        assert (0 if idx is None else idx.shape[3]) == kk
        for t in range(a, b):  # query token t reads its own exact set
            exact = is_anchor.clone()
            if idx is not None:
                it = idx[:, :, t - a]
                assert not bool(is_anchor.gather(2, it).any()), "an anchor was retrieved (counted twice)"
                exact.scatter_(2, it, True)
                scores = scores_from_keys(summed_queries(q[:, :, t:t + 1], H), k_hat, 0.25)
                scores = scores.masked_fill(is_anchor, -1e30)
                chosen = scores.gather(2, it)
                rest = scores.masked_fill(exact, -1e30).amax(2, keepdim=True)
                assert bool((chosen >= rest - 1e-4).all()), "a better-scoring token was left on its codes"
            keys = torch.where(exact[..., None], k[:, :, :nc], k_hat)
            vals = torch.where(exact[..., None], v[:, :, :nc], v_hat)
            keys, vals = torch.cat([keys, k[:, :, nc:t + 1]], 2), torch.cat([vals, v[:, :, nc:t + 1]], 2)
            ref = exact_attention(q[:, :, t:t + 1], keys, vals, 0.25)[0]
            torch.testing.assert_close(out[:, :, t - a:t - a + 1], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_on_codes_equal_scores_on_decoded_keys(seed):
    cb = codebook_with_transform("1", H, D, seed)
    codes = cb.encode(randn(2, H, 40, D, seed=seed))
    q_sum = summed_queries(randn(2, H * 3, 1, D, seed=seed + 5), H)
    torch.testing.assert_close(scores_from_codes(q_sum, codes, cb, 0.25),
                               scores_from_keys(q_sum, cb.decode(codes), 0.25), atol=1e-4, rtol=1e-4)


def test_retrieve_count_floor_fraction_and_candidates():
    assert retrieve_count(10_000, 9_900, 0.02, 64) == 200
    assert retrieve_count(1_000, 990, 0.02, 64) == 64  # the floor
    assert retrieve_count(50, 40, 0.02, 64) == 40  # never more than the candidates
    assert retrieve_count(1_000, 990, 0.0, 0) == 0
    assert retrieve_count(0, 0, 1.0, 64) == 0


def test_retrieval_lowers_the_error_against_exact_attention():
    """Sanity on one long-ish prompt: retrieving 25 % of the coded tokens (the best by their codes) is closer to
    exact attention than retrieving none, and retrieving all is exact."""
    errs = {}
    q, k, v = _inputs(1, 2, 81, 7)
    ref = exact_attention(q[:, :, 80:], k, v, 0.25)[0]
    for frac in (0.0, 0.25, 1.0):
        store, _ = _stores("lut", window=8, anchor_ratio=0.0, retrieve_fraction=frac, retrieve_min=0)
        store.attend(q[:, :, :80], k[:, :, :80], v[:, :, :80])
        errs[frac] = float((store.attend(q[:, :, 80:], k[:, :, 80:], v[:, :, 80:]) - ref).norm())
    assert errs[1.0] < 1e-4 < errs[0.25] < errs[0.0]
