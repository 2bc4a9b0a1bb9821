import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.numerics.anchor_score import (
    anchor_scores,
    first_order_output_change,
    row_sample_weights,
    weights_for_calibration,
)
from antkv_compile.numerics.attention import causal_mask, exact_attention
from numerics_helpers import randn


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.integers(1, 3), n=st.integers(2, 24), causal=st.booleans())
def test_first_order_prediction_matches_the_measured_output_change(seed, group, n, causal):
    """Small perturbations: the measured change agrees with equation (1) up to second order."""
    d, hkv = 16, 2
    q = randn(1, hkv * group, n, d, seed=seed, dtype=torch.float64)
    k = randn(1, hkv, n, d, seed=seed + 1, dtype=torch.float64)
    v = randn(1, hkv, n, d, seed=seed + 2, dtype=torch.float64)
    dk = randn(1, hkv, n, d, seed=seed + 3, dtype=torch.float64)
    dv = randn(1, hkv, n, d, seed=seed + 4, dtype=torch.float64)
    mask = causal_mask(torch.arange(n), torch.arange(n)) if causal else None
    scale = d**-0.5
    base = exact_attention(q, k, v, scale, mask)[0].double()
    predicted = first_order_output_change(q, k, v, dk, dv, scale, mask).double()
    for eps in (1e-3, 1e-4):
        # exact_attention computes in float32, so compare the float64 finite difference
        measured = _attention64(q, k + eps * dk, v + eps * dv, scale, mask) - _attention64(q, k, v, scale, mask)
        err = (measured - eps * predicted).norm() / (eps * predicted).norm()
        assert err < 50 * eps, (eps, err.item())
    assert torch.allclose(base, _attention64(q, k, v, scale, mask), atol=1e-5)


def _attention64(q, k, v, scale, mask):
    g = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ v.repeat_interleave(g, 1)


def test_ans_is_the_sum_of_the_norms_of_each_tokens_first_order_contribution():
    d, n = 8, 10
    q, k, v = randn(1, 4, n, d, seed=1), randn(1, 2, n, d, seed=2), randn(1, 2, n, d, seed=3)
    k_hat, v_hat = k + 0.1 * randn(1, 2, n, d, seed=4), v + 0.1 * randn(1, 2, n, d, seed=5)
    mask = causal_mask(torch.arange(n), torch.arange(n))
    out, lse = exact_attention(q, k, v, 0.3, mask)
    scores = anchor_scores(q, k, v, out, lse, 0.3, kind="ans", k_hat=k_hat, v_hat=v_hat, mask=mask)
    # brute force: perturb one token at a time, sum the norms of the predicted row changes
    for j in range(n):
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dk[:, :, j] = (k_hat - k)[:, :, j]
        dv[:, :, j] = (v_hat - v)[:, :, j]
        delta = first_order_output_change(q, k, v, dk, dv, 0.3, mask)  # [1, 4, n, d]
        per_kv_head = delta.norm(dim=-1).reshape(1, 2, 2, n).sum((2, 3))
        torch.testing.assert_close(scores[:, :, j], per_kv_head, atol=1e-4, rtol=1e-4)


def test_tokens_with_zero_residual_score_zero_and_attention_score_sums_attention():
    n = 6
    q, k, v = randn(1, 2, n, 8, seed=1), randn(1, 1, n, 8, seed=2), randn(1, 1, n, 8, seed=3)
    out, lse = exact_attention(q, k, v, 0.5)
    k_hat, v_hat = k.clone(), v.clone()
    k_hat[:, :, 3] += 1.0
    s = anchor_scores(q, k, v, out, lse, 0.5, kind="ans", k_hat=k_hat, v_hat=v_hat)
    assert s[0, 0, 3] > 0 and torch.count_nonzero(s) == 1
    acc = anchor_scores(q, k, v, out, lse, 0.5, kind="attention")
    torch.testing.assert_close(acc.sum(), torch.tensor(2.0 * n))  # every row's probabilities sum to one


@settings(max_examples=20, deadline=None)
@given(g=st.integers(1, 8), stride=st.integers(1, 8), band=st.integers(1, 40), n=st.integers(1, 60))
def test_row_sampling_counts_each_pair_once_in_expectation(g, stride, band, n):
    """Row-sampling weights: exactly 1 within the band; beyond it each row is sampled with weight R by the heads
    with (i + g) % R == 0, so over the G heads a row's weights sum to G when R divides G (each row read once
    per R heads), and to G on average over R consecutive rows for any R."""
    w = row_sample_weights(g, n, n, stride, band)
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    assert bool((w[:, lag < band] == 1).all())
    beyond = w[:, lag >= band]
    assert bool(((beyond == 0) | (beyond == stride)).all())
    per_row = w.sum(0)  # [Tq, Tk]: summed over the heads
    if g % stride == 0:
        assert bool((per_row == g).all())
    full = (n // stride) * stride  # rows in whole periods of R
    if full > band and stride > 1:
        col = per_row[:full, 0].reshape(-1, stride).sum(1)  # key 0: every row from `band` on is beyond the band
        first = -(-band // stride)
        assert bool((col[first:] == g * stride).all())


def test_row_sampled_scores_are_exact_for_short_windows_and_close_for_long_ones():
    """A window no longer than the band is scored exactly; a long one is estimated within a few percent of its
    total (the estimator is unbiased over the heads' phases, not exact)."""
    d, hkv, g = 16, 1, 4
    for n, exact_expected in ((24, True), (300, False)):
        q, k, v = randn(1, hkv * g, n, d, seed=1), randn(1, hkv, n, d, seed=2), randn(1, hkv, n, d, seed=3)
        k_hat, v_hat = k + 0.1 * randn(1, hkv, n, d, seed=4), v + 0.1 * randn(1, hkv, n, d, seed=5)
        mask = causal_mask(torch.arange(n), torch.arange(n))
        out, lse = exact_attention(q, k, v, d**-0.5, mask)
        kw = dict(kind="ans", k_hat=k_hat, v_hat=v_hat, mask=mask)
        exact = anchor_scores(q, k, v, out, lse, d**-0.5, **kw)
        sampled = anchor_scores(q, k, v, out, lse, d**-0.5, row_stride=4, band=32, **kw)
        if exact_expected:
            torch.testing.assert_close(sampled, exact)
        else:
            assert not torch.allclose(sampled, exact)
            assert abs(sampled.sum() / exact.sum() - 1) < 0.05


def test_calibration_weights_are_nonnegative_and_value_weight_is_accumulated_attention():
    n = 12
    q, k, v = randn(2, 4, n, 8, seed=1), randn(2, 2, n, 8, seed=2), randn(2, 2, n, 8, seed=3)
    mask = causal_mask(torch.arange(n), torch.arange(n))
    out, lse = exact_attention(q, k, v, 0.5, mask)
    wk, wv = weights_for_calibration(q, k, v, out, lse, 0.5, mask)
    assert (wk >= 0).all()
    torch.testing.assert_close(wv, anchor_scores(q, k, v, out, lse, 0.5, kind="attention", mask=mask))
