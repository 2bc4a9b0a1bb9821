"""Pre-RoPE keys in RoPE-pair sub-spaces: learning gives the layout, decode + per-pair rotation is what the store
attends over, old dense-map pre-RoPE artifacts are refused (no store keeping a decoded shadow of its codes: test_memory.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.artifact import ArtifactError, CodebookArtifact, load_artifact
from antkv_compile.backend import parse_options
from antkv_compile.config import AnTKVConfig, get_preset
from antkv_compile.numerics.attention import causal_mask, exact_attention
from antkv_compile.numerics.codebook_learning import PAIR_GROUPINGS, LearningOptions, gaussian_cost, group_pairs, learn_codebook
from antkv_compile.numerics.rope import InvFreqRope
from antkv_compile.numerics.rope_pairs import pair_layout, pair_transform
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
from antkv_compile.numerics.vq import Codebook, random_codebook
from numerics_helpers import codebook_with_transform, randn


def _keys(h, n, d, seed):
    """Correlated, unequal-energy data (so that the groupings differ)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h, d, d, generator=g) * torch.rand(h, 1, d, generator=g) ** 2
    return torch.randn(h, n, d, generator=g) @ mix + torch.randn(h, 1, d, generator=g)


@settings(max_examples=8, deadline=None)
@given(bits=st.sampled_from(["4", "2", "1", "0.375"]), how=st.sampled_from(PAIR_GROUPINGS), heads=st.integers(1, 3),
       d=st.sampled_from([16, 32]), shared=st.booleans(), seed=st.integers(0, 999))
def test_learned_pair_codebooks_are_in_the_pair_layout(bits, how, heads, d, shared, seed):
    preset = get_preset(bits)
    x = _keys(heads, 300, d, seed)
    cb = learn_codebook(x, torch.rand(heads, 300) + 0.1, preset, options=LearningOptions(pairs=how, iters=2, shared=shared),
                        generator=torch.Generator().manual_seed(seed))
    pairs = pair_layout(cb.transform, cb.sub_dim)
    assert pairs is not None and pairs.shape == (cb.num_heads, d // 2)
    torch.testing.assert_close(cb.transform @ cb.inverse, torch.eye(d).expand_as(cb.transform))


@settings(max_examples=6, deadline=None)
@given(sub_dim=st.sampled_from([4, 8, 16]), seed=st.integers(0, 999))
def test_search_grouping_is_no_worse_than_the_others_by_its_cost(sub_dim, seed):
    x = _keys(1, 500, 32, seed)[0].double()
    cov = torch.cov(x.T) + 1e-6 * torch.eye(32, dtype=torch.float64)
    costs = {}
    for how in PAIR_GROUPINGS:
        order = group_pairs(cov, sub_dim, how)
        assert sorted(order.tolist()) == list(range(16))
        costs[how] = float(gaussian_cost(cov, order.view(-1, sub_dim // 2)))
    assert costs["search"] <= min(costs.values()) * (1 + 1e-9)


def _pair_codebook(bits, heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.stack([torch.randperm(d // 2, generator=g) for _ in range(heads)])
    transform, inverse = pair_transform(pairs)
    cents = random_codebook(get_preset(bits), heads, d, generator=g).centroids
    return Codebook(cents, transform, inverse, torch.randn(heads, d, generator=g))


def _kernel_style_decode(cb: Codebook, codes: torch.Tensor, rope: InvFreqRope, positions: torch.Tensor) -> torch.Tensor:
    """What a kernel does with a pair-layout key codebook: gather one centroid per sub-space (coding space), add
    the mean, then rotate each pair (re, im) = (model dim j, j + D/2) by position * inv_freq[j] and scatter it."""
    b, h, t, _ = codes.shape
    d, half = cb.head_dim, cb.head_dim // 2
    xc = cb.decode_coding_space(codes)  # [B, H, T, D]: coding dims 2i, 2i+1 = pair pairs[i]
    pairs = pair_layout(cb.transform, cb.sub_dim)  # [H, D/2]
    re, im = xc[..., 0::2], xc[..., 1::2]  # [B, H, T, D/2]
    mean = cb.mean[:, None, :]  # [H, 1, D]
    re = re + torch.gather(mean[..., :half].expand(h, t, half), 2, pairs[:, None, :].expand(h, t, half))
    im = im + torch.gather(mean[..., half:].expand(h, t, half), 2, pairs[:, None, :].expand(h, t, half))
    theta = positions.float()[:, None] * rope.inv_freq[pairs][:, None, :]  # [H, T, D/2]
    c, s = theta.cos() * rope.attention_scaling, theta.sin() * rope.attention_scaling
    out = torch.empty(b, h, t, d)
    idx = pairs[:, None, :].expand(h, t, half)
    out[..., :half] = torch.zeros(b, h, t, half).scatter(3, idx.expand(b, h, t, half), re * c - im * s)
    out[..., half:] = torch.zeros(b, h, t, half).scatter(3, idx.expand(b, h, t, half), re * s + im * c)
    return out


@settings(max_examples=8, deadline=None)
@given(prefill=st.integers(0, 30), n=st.integers(1, 50), ratio=st.sampled_from([0.0, 0.1]), window=st.integers(1, 9),
       bits=st.sampled_from(["2", "1", "0.375"]), seed=st.integers(0, 999))
def test_pre_rope_store_attends_over_decoded_codes_rotated_per_pair(prefill, n, ratio, window, bits, seed):
    d, h = 16, 2
    prefill = min(prefill, n)
    rope = InvFreqRope(1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)), attention_scaling=1.1)
    geom = StoreGeometry(1, h, d, 64, torch.float32, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(bits=bits, window=window, anchor_ratio=ratio, key_space="pre_rope", coded_path="dequantized")
    s = AnTKVLayerStore(geom, _pair_codebook(bits, h, d, seed), codebook_with_transform(bits, h, d, seed + 1), config,
                        rope=rope)
    q = randn(1, 2 * h, n, d, seed=seed)
    k, v = randn(1, h, n, d, seed=seed + 1), randn(1, h, n, d, seed=seed + 2)
    steps = ([(0, prefill)] if prefill else []) + [(t, t + 1) for t in range(prefill, n)]
    for a, b in steps:
        nc = s.n_coded
        k_seen = _kernel_style_decode(s.cb_k, s.codes_k[:, :, :nc], rope, torch.arange(nc))
        torch.testing.assert_close(k_seen, s.decode_coded(0, nc)[0], atol=1e-5, rtol=1e-5)
        v_seen = s.cb_v.decode(s.codes_v[:, :, :nc])
        for i in range(s.anchor_capacity):
            for head in range(h):
                pos = int(s.anchor_pos[0, head, i])
                if pos >= 0:
                    k_seen[0, head, pos] = s.anchor_k[0, head, i]
                    v_seen[0, head, pos] = s.anchor_v[0, head, i]
        keys, vals = torch.cat([k_seen, k[:, :, nc:b]], 2), torch.cat([v_seen, v[:, :, nc:b]], 2)
        ref = exact_attention(q[:, :, a:b], keys, vals, 0.25, causal_mask(torch.arange(a, b), torch.arange(b)))[0]
        torch.testing.assert_close(s.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]), ref, atol=2e-5, rtol=2e-5)


def _artifact(key_codebook_fn, d=16, layers=2):
    info = {"id": "tiny", "num_layers": layers, "num_kv_heads": 2, "num_q_heads": 4, "head_dim": d}
    keys = [key_codebook_fn("1", 2, d, i) for i in range(layers)]
    values = [codebook_with_transform("1", 2, d, 10 + i) for i in range(layers)]
    manifest = {"model": info, "preset": {"name": "1", "sub_dim": 8, "code_bits": 8, "stages": 1}, "key_space": "pre_rope",
                "rope": {"attention_scaling": 1.0}}
    return CodebookArtifact(keys, values, manifest, 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)))


def test_old_dense_map_pre_rope_artifact_is_refused_with_advice(tmp_path):
    old = _artifact(codebook_with_transform)  # a dense per-head coding map, as pre-RoPE artifacts had
    d = old.save(tmp_path / "old")
    with pytest.raises(ArtifactError, match="dense per-head coding map.*Recalibrate it: antkv-compile calibrate --pre-rope"):
        load_artifact(d)
    with pytest.raises(ArtifactError, match="Recalibrate it"):
        parse_options({"artifact": old})
    new = load_artifact(_artifact(_pair_codebook).save(tmp_path / "new"))  # the pair layout loads
    config, art, _, _ = parse_options({"artifact": new})
    assert config.key_space == "pre_rope" and art is new
