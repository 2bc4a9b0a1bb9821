import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.numerics.attention import (
    causal_mask,
    dequantized_attention,
    exact_attention,
    lut_attention,
    merge_partials,
)
from numerics_helpers import codebook_with_transform, randn


@settings(max_examples=25, deadline=None)
@given(
    bits_k=st.sampled_from(["4", "2", "1", "0.75", "0.375"]),
    bits_v=st.sampled_from(["2", "1", "0.375"]),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    q_len=st.integers(1, 5),
    n=st.integers(1, 60),
    mode=st.sampled_from(["histogram", "gather"]),
    seed=st.integers(0, 10_000),
)
def test_lut_attention_equals_dequantize_then_attend(bits_k, bits_v, batch, kv_heads, group, q_len, n, mode, seed):
    d = 16
    cbk = codebook_with_transform(bits_k, kv_heads, d, seed=seed)
    cbv = codebook_with_transform(bits_v, kv_heads, d, seed=seed + 1)
    q = randn(batch, kv_heads * group, q_len, d, seed=seed + 2)
    codes_k = cbk.encode(randn(batch, kv_heads, n, d, seed=seed + 3))
    codes_v = cbv.encode(randn(batch, kv_heads, n, d, seed=seed + 4))
    mask = torch.rand(batch, kv_heads, q_len, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    out, lse = lut_attention(q, codes_k, codes_v, cbk, cbv, 0.3, mask, mode)
    ref, ref_lse = dequantized_attention(q, codes_k, codes_v, cbk, cbv, 0.3, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(1, 10), min_size=1, max_size=4), q_len=st.integers(1, 4), seed=st.integers(0, 999))
def test_merging_partials_over_a_split_equals_attention_over_the_whole(splits, q_len, seed):
    n = sum(splits)
    q, k, v = randn(2, 4, q_len, 8, seed=seed), randn(2, 2, n, 8, seed=seed + 1), randn(2, 2, n, 8, seed=seed + 2)
    whole = exact_attention(q, k, v, 0.5)
    parts, start = [], 0
    for s in splits:
        parts.append(exact_attention(q, k[:, :, start:start + s], v[:, :, start:start + s], 0.5))
        start += s
    out, lse = merge_partials(parts)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)


def test_exact_attention_matches_torch_sdpa_with_gqa_and_causal_positions():
    q, k, v = randn(2, 6, 5, 16, seed=1), randn(2, 2, 9, 16, seed=2), randn(2, 2, 9, 16, seed=3)
    mask = causal_mask(torch.arange(4, 9), torch.arange(9))
    out, _ = exact_attention(q, k, v, 0.25, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.25
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_have_minus_infinite_lse_and_do_not_poison_a_merge():
    q, k, v = randn(1, 2, 3, 8), randn(1, 1, 4, 8, seed=1), randn(1, 1, 4, 8, seed=2)
    none = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    out, lse = exact_attention(q, k, v, 1.0, none)
    assert torch.isneginf(lse).all() and (out == 0).all()
    merged, mlse = merge_partials([(out, lse), exact_attention(q, k, v, 1.0)])
    torch.testing.assert_close(merged, exact_attention(q, k, v, 1.0)[0])
