import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import PRESETS, get_preset
from antkv_compile.numerics.codebook_learning import LearningOptions, learn_codebook
from antkv_compile.numerics.kmeans import quantization_error, weighted_kmeans

from numerics_helpers import codebook_with_transform, randn

bits_st = st.sampled_from(sorted(PRESETS))


@settings(max_examples=20, deadline=None)
@given(bits=bits_st, heads=st.integers(1, 3), tokens=st.integers(1, 40), seed=st.integers(0, 10_000),
       shared=st.booleans())
def test_decode_of_codes_reencodes_to_the_same_codes(bits, heads, tokens, seed, shared):
    """encode∘decode is exact on centroids: decoding gives a point that re-encodes to itself."""
    cb = codebook_with_transform(bits, heads, 32, seed=seed, shared=shared)
    x = randn(2, heads, tokens, 32, seed=seed + 1)
    codes = cb.encode(x)
    assert codes.shape == (2, heads, tokens, cb.codes_per_vector)
    x_hat = cb.decode(codes)
    assert torch.equal(cb.encode(x_hat), codes)
    # idempotent: quantizing a quantized vector changes nothing
    torch.testing.assert_close(cb.decode(cb.encode(x_hat)), x_hat)


@settings(max_examples=10, deadline=None)
@given(bits=bits_st, seed=st.integers(0, 10_000))
def test_encode_picks_the_nearest_centroid_in_coding_space(bits, seed):
    cb = codebook_with_transform(bits, 2, 16, seed=seed)
    x = randn(1, 2, 7, 16, seed=seed)
    xc = cb.to_coding_space(x)
    codes, resid = cb.encode_coding_space(xc)
    if cb.stages == 1:
        s, sd = cb.num_subspaces, cb.sub_dim
        sub = xc.reshape(1, 2, 7, s, 1, sd)
        cents = cb.centroids[0][None, :, None]  # [1, H, 1, S, M, sd]
        brute = ((sub - cents) ** 2).sum(-1).argmin(-1)
        assert torch.equal(codes.long(), brute)
    torch.testing.assert_close(cb.decode_coding_space(codes) + resid, xc, atol=1e-5, rtol=1e-5)


def test_presets_have_the_advertised_bits():
    assert {k: p.nominal_bits for k, p in PRESETS.items()} == {"4": 4, "2": 2, "1": 1, "0.75": 0.75, "0.375": 0.375}
    assert get_preset(1.0).name == "1"
    with pytest.raises(ValueError, match="unknown bits preset"):
        get_preset("3")
    with pytest.raises(ValueError, match="does not divide"):
        get_preset("0.375").num_subspaces(40)


def test_weighted_kmeans_follows_the_weights():
    """Two clusters of points; heavy weights on one pulls the single centroid to it."""
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 10])[None]
    w = torch.cat([torch.full((50,), 100.0), torch.full((50,), 1.0)])[None]
    c = weighted_kmeans(x, w, 1, iters=5, generator=torch.Generator().manual_seed(0))
    assert c[0, 0].norm() < 0.2  # close to the heavy cluster at 0, far from the mean 5√2


def test_kmeans_beats_random_codebook_and_weighting_helps_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2000, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.1])
    w = torch.rand(2, 2000, generator=g) ** 4
    c_w = weighted_kmeans(x, w, 16, iters=15, generator=torch.Generator().manual_seed(1))
    c_u = weighted_kmeans(x, None, 16, iters=15, generator=torch.Generator().manual_seed(1))
    rand = x[:, :16]
    assert (quantization_error(x, w, c_w) < quantization_error(x, w, rand)).all()
    assert (quantization_error(x, w, c_w) <= quantization_error(x, w, c_u) * 1.02).all()


def test_metric_space_codebook_lowers_the_metric_error():
    """Learning in the metric's coding space reduces the error the metric measures."""
    g = torch.Generator().manual_seed(0)
    d = 16
    x = torch.randn(1, 3000, d, generator=g) @ torch.randn(d, d, generator=g)
    scales = torch.logspace(1, -1, d)
    metric = torch.diag(scales**2)[None]  # errors on the first axes cost 100x more
    preset = get_preset("2")
    plain = learn_codebook(x, None, preset, options=LearningOptions(weighted=False, metric=False, rotate=False, iters=10),
                           generator=torch.Generator().manual_seed(0))
    aware = learn_codebook(x, None, preset, metric=metric, options=LearningOptions(weighted=False, iters=10),
                           generator=torch.Generator().manual_seed(0))

    def metric_error(cb):
        err = cb.decode(cb.encode(x[None]))[0] - x
        return ((err * scales) ** 2).sum(-1).mean()

    assert metric_error(aware) < 0.8 * metric_error(plain)
