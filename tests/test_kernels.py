"""The Triton kernels against their PyTorch references (CPU: Triton interpreter), and the antkv custom ops.

Without CUDA, TRITON_INTERPRET=1 is set here before the kernel modules are imported (the @triton.jit
decorator reads it at import). Shapes are small so the whole file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernel_helpers import DEV, needs_triton  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from antkv_compile.config import AnTKVConfig, VQPreset, get_preset  # noqa: E402
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry  # noqa: E402
from antkv_compile.numerics.vq import Codebook, random_codebook  # noqa: E402
from numerics_helpers import codebook_with_transform  # noqa: E402


from antkv_compile.kernels import anchors as AN  # noqa: E402
from antkv_compile.kernels import decode_attention as DA  # noqa: E402
from antkv_compile.kernels import prefill_attention as PA  # noqa: E402
from antkv_compile.kernels import vq_encode as VQ  # noqa: E402

HYP = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEV)


def _codebook(bits: str, heads: int, d: int, seed: int, shared: bool = False, stages: int = 1) -> Codebook:
    if stages == 1:
        return codebook_with_transform(bits, heads, d, seed, shared)
    p = get_preset(bits)
    base = random_codebook(VQPreset("x", p.sub_dim, p.code_bits, stages), 1 if shared else heads, d, generator=_gen(seed))
    a = torch.randn(base.num_heads, d, d, generator=_gen(seed + 1)) / d**0.5 + 2 * torch.eye(d)
    return Codebook(base.centroids, a, torch.linalg.inv(a), torch.randn(base.num_heads, d, generator=_gen(seed + 2)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    return float((a[finite] - b[finite]).norm() / b[finite].norm().clamp_min(1e-30))


TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


# ---------------------------------------------------------------------------------------------- vq encode
@needs_triton
@HYP
@given(b=st.integers(1, 2), h=st.integers(1, 2), t=st.sampled_from([1, 5, 64, 67]), d=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from(["1", "0.375", "2"]), stages=st.sampled_from([1, 2]), shared=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99))
def test_vq_encode_matches_reference(b, h, t, d, bits, stages, shared, dtype, seed):
    cb = _codebook(bits, h, d, seed, shared, stages).to(DEV)
    x = _randn(b, h, t, d, seed=seed + 7, scale=2.0, dtype=dtype)
    xc = VQ.to_coding_space(x, cb.transform, cb.mean)
    codes = torch.full((b, h, t, cb.codes_per_vector), 255, dtype=torch.uint8, device=DEV)
    res = torch.full((b, h, t, d), float("nan"), device=DEV)
    VQ.vq_encode_coding_space_triton(xc, cb.centroids, out=(codes, res))
    assert not res.isnan().any(), "residual not written everywhere"
    # every code written: a second run over codes pre-filled with 0 instead of 255 gives the same codes (a uint8
    # range check alone is vacuous at 256 centroids)
    codes0 = torch.zeros_like(codes)
    VQ.vq_encode_coding_space_triton(xc, cb.centroids, out=(codes0, torch.empty_like(res)))
    assert torch.equal(codes, codes0), "codes not written everywhere"
    if cb.num_centroids < 256:
        assert int(codes.max()) < cb.num_centroids
    ref_codes, ref_res = cb.encode_coding_space(xc)
    # the residual is exactly what our codes leave over
    torch.testing.assert_close(res, xc - cb.decode_coding_space(codes), atol=1e-5, rtol=1e-5)
    if stages == 1:  # greedy stage 1 is a plain nearest-centroid search: our pick is as near as the reference's
        mine = (res.reshape(b, h, t, -1, cb.sub_dim) ** 2).sum(-1)
        theirs = (ref_res.reshape(b, h, t, -1, cb.sub_dim) ** 2).sum(-1)
        assert bool((mine <= theirs + 1e-4 * (1 + theirs)).all())
    assert (codes == ref_codes.to(torch.uint8)).float().mean() > 0.97
    # the op-level contract: residual in the original space = decode(codes) - x
    c2, dx = VQ.vq_encode_triton(x, cb.centroids, cb.transform, cb.inverse, cb.mean)
    torch.testing.assert_close(dx, cb.decode(c2) - x.float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- prefill
@needs_triton
@HYP
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]), t=st.sampled_from([1, 7, 32, 45, 70]),
       d=st.sampled_from([16, 32, 64]), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99))
def test_prefill_attention_and_anchor_scores_match_reference(b, hkv, g, t, d, dtype, seed):
    scale = d**-0.5
    q = _randn(b, hkv * g, t, d, seed=seed, dtype=dtype)
    k, v = _randn(b, hkv, t, d, seed=seed + 1, dtype=dtype), _randn(b, hkv, t, d, seed=seed + 2, dtype=dtype)
    dk, dv = _randn(b, hkv, t, d, seed=seed + 3, scale=0.3), _randn(b, hkv, t, d, seed=seed + 4, scale=0.3)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hkv * g, t), float("nan"), device=DEV)
    PA.prefill_attention_triton(q, k, v, scale, out=(out, lse))
    ref_out, ref_lse, ref_sc = PA.prefill_attention_ans_reference(q, k, v, dk, dv, scale)
    assert _rel(out, ref_out) < TOL[dtype] and _rel(lse, ref_lse) < TOL[dtype]
    scores = torch.full((b, hkv, t), float("nan"), device=DEV)
    PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, scale, scores=scores)
    assert _rel(scores, ref_sc) < 5 * TOL[dtype]
    o2, l2, s2 = PA.prefill_attention_ans_triton(q, k, v, dk, dv, scale)
    assert _rel(o2, ref_out) < TOL[dtype] and _rel(s2, ref_sc) < 5 * TOL[dtype]
    # a partial flush scores its oldest tk tokens over all t queries
    tk = max(1, (2 * t) // 3)
    sub = [x[:, :, :tk] for x in (k, v, dk, dv)]
    part = PA.anchor_scores_triton(q, *sub, out, lse, scale)
    assert _rel(part, PA.anchor_scores_reference(q, *sub, ref_out, ref_lse, scale)) < 5 * TOL[dtype]


@needs_triton
def test_anchor_scores_take_the_rows_norms_or_compute_them():
    """The score kernel reads |o_i|^2 per row: given (e.g. by whoever wrote out) or computed from out; a tensor of
    the wrong shape is refused."""
    q = _randn(1, 4, 40, 32, seed=1, dtype=torch.float16)
    k, v = _randn(1, 2, 40, 32, seed=2, dtype=torch.float16), _randn(1, 2, 40, 32, seed=3, dtype=torch.float16)
    dk, dv = _randn(1, 2, 40, 32, seed=4, scale=0.3), _randn(1, 2, 40, 32, seed=5, scale=0.3)
    out, lse = PA.prefill_attention_triton(q, k, v, 32**-0.5)
    own = PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, 32**-0.5)
    given_ = PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, 32**-0.5, o2=out.float().square().sum(-1))
    torch.testing.assert_close(own, given_, rtol=1e-5, atol=1e-6)
    wrong = PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, 32**-0.5, o2=torch.zeros_like(lse))
    assert _rel(wrong, own) > 1e-2  # the norms are used
    with pytest.raises(ValueError, match="shaped like lse"):
        PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, 32**-0.5, o2=lse[..., :-1])


@needs_triton
@HYP
@given(hkv=st.integers(1, 2), g=st.sampled_from([1, 3, 4]), t=st.sampled_from([40, 97, 150]),
       stride=st.sampled_from([2, 3, 4]), band=st.sampled_from([1, 16, 50]),
       blocks=st.sampled_from([(16, 16), (32, 32), (16, 64), (64, 128)]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99))
def test_row_sampled_anchor_scores_match_reference(hkv, g, t, stride, band, blocks, dtype, seed):
    """Rows sampled beyond the band: the kernel computes the sampled reference for any block size (the band and
    the strided rows are defined per pair, not per tile), also for a partial flush (fewer keys than queries)."""
    d = 32
    scale = d**-0.5
    q = _randn(1, hkv * g, t, d, seed=seed, dtype=dtype)
    k, v = _randn(1, hkv, t, d, seed=seed + 1, dtype=dtype), _randn(1, hkv, t, d, seed=seed + 2, dtype=dtype)
    dk, dv = _randn(1, hkv, t, d, seed=seed + 3, scale=0.3), _randn(1, hkv, t, d, seed=seed + 4, scale=0.3)
    out, lse, exact = PA.prefill_attention_ans_reference(q, k, v, dk, dv, scale)
    tk = t - t // 3
    sub = [x[:, :, :tk] for x in (k, v, dk, dv)]
    ref = PA.anchor_scores_reference(q, *sub, out, lse, scale, stride, band)
    got = PA.anchor_scores_triton(q, *sub, out, lse, scale, row_stride=stride, band=band,
                                  blocks=(*blocks, 4, 1))
    assert _rel(got, ref) < 5 * TOL[dtype]
    if t - 1 - band >= stride:  # some pairs lie beyond the band: the test can tell sampled from exact scores
        assert _rel(ref, exact[:, :, :tk]) > 1e-3
    _, _, s3 = PA.prefill_attention_ans_triton(q, k, v, dk, dv, scale, row_stride=stride, band=band)
    assert _rel(s3, PA.anchor_scores_reference(q, k, v, dk, dv, out, lse, scale, stride, band)) < 5 * TOL[dtype]

# ---------------------------------------------------------------------------------------------- decode
def _decode_inputs(b, hkv, g, tq, d, n_cap, a_cap, w_cap, bits, stages, shared, dtype, seed, lengths=None):
    """Random store buffers with per-sequence lengths, anchors at random coded positions, a partial window."""
    gen = _gen(seed)
    cbk = _codebook(bits, hkv, d, seed, shared, stages).to(DEV)
    cbv = _codebook(bits, hkv, d, seed + 50, shared, stages).to(DEV)
    m = cbk.num_centroids
    codes_k = torch.randint(0, m, (b, hkv, n_cap, cbk.codes_per_vector), generator=gen, dtype=torch.uint8).to(DEV)
    codes_v = torch.randint(0, m, (b, hkv, n_cap, cbv.codes_per_vector), generator=gen, dtype=torch.uint8).to(DEV)
    n_coded = lengths if lengths is not None else torch.randint(0, n_cap + 1, (b,), generator=gen)
    n_coded = n_coded.to(torch.int32)
    pos = torch.full((b, hkv, a_cap), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(hkv):
            n = int(n_coded[i])
            cnt = min(n, int(torch.randint(0, a_cap + 1, (1,), generator=gen)))
            perm = torch.randperm(max(n, 1), generator=gen)[:cnt]
            slots = torch.randperm(a_cap, generator=gen)[:cnt]
            pos[i, j, slots] = perm.to(torch.int32)
    pos = pos.to(DEV)
    win_len = torch.randint(tq, w_cap + 1, (b,), generator=gen).to(torch.int32).to(DEV)
    q = _randn(b, hkv * g, tq, d, seed=seed + 1, dtype=dtype)
    ak, av = _randn(b, hkv, a_cap, d, seed=seed + 2, dtype=dtype), _randn(b, hkv, a_cap, d, seed=seed + 3, dtype=dtype)
    wk, wv = _randn(b, hkv, w_cap, d, seed=seed + 4, dtype=dtype), _randn(b, hkv, w_cap, d, seed=seed + 5, dtype=dtype)
    bits_ = DA.bits_from_positions(pos, n_cap)
    return (q, codes_k, codes_v, bits_, n_coded.to(DEV), ak, av, pos, wk, wv, win_len,
            cbk.centroids, cbk.inverse, cbk.mean, cbv.centroids, cbv.inverse, cbv.mean, d**-0.5)


@needs_triton
@HYP
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]), tq=st.sampled_from([1, 2]),
       d=st.sampled_from([16, 32, 64]), n_cap=st.sampled_from([1, 40, 130]), a_cap=st.sampled_from([0, 1, 5]),
       bits=st.sampled_from(["1", "0.375"]), stages=st.sampled_from([1, 2]), shared=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), splits=st.sampled_from([None, (3, 2)]),
       key_lut=st.sampled_from([None, False]), block_a=st.sampled_from([32, 64]),
       exact_splits=st.sampled_from([None, 3]), seed=st.integers(0, 99))
def test_decode_attention_matches_reference(b, hkv, g, tq, d, n_cap, a_cap, bits, stages, shared, dtype, splits,
                                            key_lut, block_a, exact_splits, seed):
    args = _decode_inputs(b, hkv, g, tq, d, n_cap, a_cap, 5, bits, stages, shared, dtype, seed)
    out = torch.full_like(args[0], float("nan"))
    lse = torch.full(args[0].shape[:3], float("nan"), device=DEV)
    DA.decode_attention_triton(*args, splits=splits, out=(out, lse), poison=True, block_n=32, key_lut=key_lut,
                               block_a=block_a, exact_splits=exact_splits)  # exact programs: anchors per step, programs per head
    ref_out, ref_lse = DA.decode_attention_reference(*args)
    assert not out.isnan().any() and not lse.isnan().any()
    assert _rel(out, ref_out) < 2 * TOL[dtype] and _rel(lse, ref_lse) < TOL[dtype]
    # histogram and gather value modes of the reference agree (the kernel gathers)
    g_out, _ = DA.decode_attention_reference(*args, value_mode="gather")
    assert _rel(g_out, ref_out) < TOL[dtype]


@needs_triton
def test_decode_attention_edge_lengths():
    """A sequence with nothing coded, one with a single coded token that is an anchor, one full."""
    b, hkv, g, d, n_cap = 3, 2, 2, 32, 70
    lengths = torch.tensor([0, 1, 70])
    args = list(_decode_inputs(b, hkv, g, 1, d, n_cap, 3, 4, "1", 1, False, torch.float32, 5, lengths))
    args[7][1, :, 0] = 0  # token 0 of sequence 1 is an anchor: its code must not be read
    args[3] = DA.bits_from_positions(args[7], n_cap)
    out, lse = DA.decode_attention_triton(*args, poison=True)
    ref_out, ref_lse = DA.decode_attention_reference(*args)
    assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-5


@needs_triton
def test_decode_attention_fp8_centroids():
    """Centroids stored in fp8 (a storage choice of the caller) are read as such: same result as the reference
    fed the same fp8 values."""
    args = list(_decode_inputs(2, 2, 4, 1, 32, 90, 4, 6, "1", 1, False, torch.float16, 11))
    args[11], args[14] = args[11].to(torch.float8_e4m3fn), args[14].to(torch.float8_e4m3fn)
    out, lse = DA.decode_attention_triton(*args, poison=True)
    ref_out, ref_lse = DA.decode_attention_reference(*args)
    assert _rel(out, ref_out) < 2 * TOL[torch.float16] and _rel(lse, ref_lse) < TOL[torch.float16]


# The two Triton coded loops (key LUT, G*Tq <= 8; dequantized, key_lut=False) on shapes that cover code words of 4,
# 2 and 1 codes, two-stage codebooks, G*Tq = 4/8/1 query rows, a sequence with nothing coded, anchors, splits
# longer than one block, fp32 and fp16.
LOOP_SHAPES = [  # dtype, bits, stages, d, g, tq, block_n, lengths
    (torch.float32, "1", 1, 32, 4, 1, 32, [150, 0]),
    (torch.float16, "0.375", 2, 32, 2, 2, 32, [97, 150]),
    (torch.float16, "1", 1, 16, 1, 1, 64, [150, 61]),
    (torch.float32, "0.375", 1, 16, 4, 2, 32, [1, 150]),
]


@needs_triton
@pytest.mark.parametrize("key_lut", [True, False])
def test_decode_coded_loops_match_reference(key_lut):
    for i, (dtype, bits, stages, d, g, tq, block_n, lengths) in enumerate(LOOP_SHAPES):
        args = _decode_inputs(2, 2, g, tq, d, 150, 5, 6, bits, stages, False, dtype, 30 + i, torch.tensor(lengths))
        out = torch.full_like(args[0], float("nan"))
        lse = torch.full(args[0].shape[:3], float("nan"), device=DEV)
        DA.decode_attention_triton(*args, splits=(3, 2), out=(out, lse), poison=True, block_n=block_n,
                                   key_lut=key_lut)
        ref_out, ref_lse = DA.decode_attention_reference(*args)
        assert not out.isnan().any() and not lse.isnan().any(), i
        assert _rel(out, ref_out) < 2 * TOL[dtype] and _rel(lse, ref_lse) < TOL[dtype], i


def _store(b, hkv, d, cap, dtype, seed, window=8, ratio=0.1):
    geom = StoreGeometry(b, hkv, d, cap, dtype, torch.device(DEV), scale=d**-0.5)
    cfg = AnTKVConfig(bits="1", window=window, anchor_ratio=ratio)
    return AnTKVLayerStore(geom, codebook_with_transform("1", hkv, d, seed), codebook_with_transform("1", hkv, d, seed + 1),
                           cfg)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_equals_the_store(dtype):
    """The op computes what AnTKVLayerStore.attend returns for the next token, from the store's own buffers."""
    b, hkv, g, d, cap = 2, 2, 3, 32, 100
    st_ = _store(b, hkv, d, cap, dtype, 1)
    n = 45
    q, k, v = _randn(b, hkv * g, n + 1, d, seed=1, dtype=dtype), _randn(b, hkv, n + 1, d, seed=2, dtype=dtype), \
        _randn(b, hkv, n + 1, d, seed=3, dtype=dtype)
    st_.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30])
    for t in range(30, n):
        st_.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert st_.num_anchors > 0 and st_.n_window > 0
    w_cap, nw = 16, st_.n_window
    wk = torch.zeros(b, hkv, w_cap, d, dtype=dtype, device=DEV)
    wv = torch.zeros_like(wk)
    wk[:, :, :nw], wv[:, :, :nw] = st_.win_k, st_.win_v
    wk[:, :, nw], wv[:, :, nw] = k[:, :, n], v[:, :, n]
    full = lambda x: torch.full((b,), x, dtype=torch.int32, device=DEV)  # noqa: E731
    args = (q[:, :, n:n + 1], st_.codes_k, st_.codes_v, DA.bits_from_positions(st_.anchor_pos, cap), full(st_.n_coded),
            st_.anchor_k, st_.anchor_v, st_.anchor_pos, wk, wv, full(nw + 1), st_.cb_k.centroids, st_.cb_k.inverse,
            st_.cb_k.mean, st_.cb_v.centroids, st_.cb_v.inverse, st_.cb_v.mean, st_.geom.scale)
    out, lse = DA.decode_attention_triton(*args)
    expected = st_.attend(q[:, :, n:n + 1], k[:, :, n:n + 1], v[:, :, n:n + 1])
    assert _rel(out, expected) < 2 * TOL[dtype]


# ---------------------------------------------------------------------------------------------- flush / anchors
@pytest.mark.parametrize("ratio,n", [(0.07, 100), (0.01, 300), (0.3, 7), (0.01, 1), (1.0, 5), (0.0, 10)])
def test_anchors_to_keep_matches_config(ratio, n):
    cfg = AnTKVConfig(anchor_ratio=ratio)
    keep = AN.anchors_to_keep(torch.tensor([n]), ratio, capacity=10**6)
    assert int(keep[0]) == cfg.anchors_for(n)


def _flush_case(dtype, use_triton, seed=3, b=2, hkv=2, g=2, d=32, cap=64, window=8, prefill=20, flush=None):
    """Run a store up to the step that flushes, snapshot its buffers, flush both ways, compare.

    Works for the store's full-window flush and for its partial flush (the oldest ``flush`` tokens, scored
    over all of the window's queries)."""
    st_ = _store(b, hkv, d, cap, dtype, seed, window=window, ratio=0.15)
    if flush is not None:
        st_.flush = flush
    total = prefill + 3 * window
    q, k, v = (_randn(b, hkv * g, total, d, seed=seed, dtype=dtype), _randn(b, hkv, total, d, seed=seed + 1, dtype=dtype),
               _randn(b, hkv, total, d, seed=seed + 2, dtype=dtype))
    st_.attend(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])
    t = prefill
    while st_.n_window + 1 < st_.window or st_.n_coded < prefill:  # stop one token before the next flush
        st_.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        t += 1
    n0 = st_.n_coded
    bufs = {name: getattr(st_, name).clone() for name in ("codes_k", "codes_v", "anchor_k", "anchor_v", "anchor_pos",
                                                            "anchor_score")}
    bufs["anchor_bits"] = DA.bits_from_positions(st_.anchor_pos, cap)
    full_window = st_.window
    st_.window = 10**9  # attend the flushing step without flushing, to see the window's final rows
    st_.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    st_.window = full_window
    n = st_.n_window - (st_.window - st_.flush)
    win = (st_.win_q, st_.win_k[:, :, :n], st_.win_v[:, :, :n], st_.win_out, st_.win_lse)
    st_._flush(n)  # the reference
    n_coded = torch.full((b,), n0, dtype=torch.int32, device=DEV)
    AN.window_flush_(bufs["codes_k"], bufs["codes_v"], bufs["anchor_k"], bufs["anchor_v"], bufs["anchor_pos"],
                     bufs["anchor_score"], bufs["anchor_bits"], n_coded, *win,
                     st_.cb_k.centroids, st_.cb_k.transform, st_.cb_k.inverse, st_.cb_k.mean,
                     st_.cb_v.centroids, st_.cb_v.transform, st_.cb_v.inverse, st_.cb_v.mean,
                     st_.geom.scale, st_.config.anchor_ratio, "ans", use_triton=use_triton)
    return st_, bufs, cap


@pytest.mark.parametrize("flush", [None, 3])
@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_flush_equals_the_store(dtype, use_triton, flush):
    st_, bufs, cap = _flush_case(dtype, use_triton, flush=flush)
    assert (bufs["codes_k"] == st_.codes_k).float().mean() > 0.99
    assert (bufs["codes_v"] == st_.codes_v).float().mean() > 0.99
    for b in range(st_.geom.batch):
        for h in range(st_.geom.num_kv_heads):
            mine = sorted(int(p) for p in bufs["anchor_pos"][b, h] if p >= 0)
            theirs = sorted(int(p) for p in st_.anchor_pos[b, h] if p >= 0)
            assert mine == theirs
    valid = st_.anchor_pos >= 0
    torch.testing.assert_close(bufs["anchor_score"][valid], st_.anchor_score[valid], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(bufs["anchor_k"][valid], st_.anchor_k[valid])
    assert torch.equal(bufs["anchor_bits"], DA.bits_from_positions(st_.anchor_pos, cap))
    assert torch.equal(DA.anchor_mask_from_bits(bufs["anchor_bits"], cap).sum(-1), valid.sum(-1))


# ---------------------------------------------------------------------------------------------- op registration
def _op_args(dtype=torch.float32):
    b, hkv, g, d, t = 1, 2, 2, 16, 9
    cb = codebook_with_transform("1", hkv, d, 4)
    q = _randn(b, hkv * g, t, d, seed=1, dtype=dtype)
    k, v = _randn(b, hkv, t, d, seed=2, dtype=dtype), _randn(b, hkv, t, d, seed=3, dtype=dtype)
    dk, dv = _randn(b, hkv, t, d, seed=4, scale=0.2), _randn(b, hkv, t, d, seed=5, scale=0.2)
    dec = _decode_inputs(b, hkv, g, 1, d, 40, 2, 4, "1", 1, False, dtype, 6)
    return cb, q, k, v, dk, dv, dec


def test_ops_opcheck():
    from antkv_compile.kernels import ops

    cb, q, k, v, dk, dv, dec = _op_args()
    cb = cb.to(DEV)
    out, lse = ops.prefill_attention(q, k, v, 0.25)
    cases = {
        "vq_encode": (k, cb.centroids, cb.transform, cb.inverse, cb.mean),
        "prefill_attention": (q, k, v, 0.25),
        "anchor_scores": (q, k, v, dk, dv, out, lse, 0.25),
        "prefill_attention_ans": (q, k, v, dk, dv, 0.25),
        "decode_attention": dec,
    }
    for name, args in cases.items():
        torch.library.opcheck(ops.OPS[name], args)
    # mutating ops, on fresh buffers each time
    b, hkv, _, d = k.shape
    cap, a_cap, w = 32, 4, k.shape[2]

    def buffers():
        return (torch.zeros(b, hkv, cap, cb.codes_per_vector, dtype=torch.uint8, device=DEV), torch.zeros(b, hkv, cap, cb.codes_per_vector, dtype=torch.uint8, device=DEV),
                torch.zeros(b, hkv, a_cap, d, device=DEV), torch.zeros(b, hkv, a_cap, d, device=DEV),
                torch.full((b, hkv, a_cap), -1, dtype=torch.int32, device=DEV),
                torch.full((b, hkv, a_cap), float("-inf"), device=DEV), torch.zeros(b, hkv, 1, dtype=torch.int32, device=DEV))

    n_coded = torch.full((b,), 5, dtype=torch.int32, device=DEV)
    scores = _randn(b, hkv, w, seed=9).abs()
    torch.library.opcheck(ops.select_anchors, (*buffers()[2:], scores, k, v, n_coded, 0.2))
    torch.library.opcheck(ops.window_flush, (*buffers(), n_coded, q, k, v, out, lse, cb.centroids, cb.transform, cb.inverse,
                                             cb.mean, cb.centroids, cb.transform, cb.inverse, cb.mean, 0.25, 0.2, "ans"))


def test_ops_compile_functionalize_mutation():
    """Under torch.compile the mutating flush is functionalized and applied in place; decode reads the result."""
    from antkv_compile.kernels import ops

    cb, q, k, v, dk, dv, dec = _op_args()
    cb = cb.to(DEV)
    b, hkv, w, d = k.shape
    cap, a_cap = 32, 4

    def make():
        return [torch.zeros(b, hkv, cap, cb.codes_per_vector, dtype=torch.uint8, device=DEV), torch.zeros(b, hkv, cap, cb.codes_per_vector, dtype=torch.uint8, device=DEV),
                torch.zeros(b, hkv, a_cap, d, device=DEV), torch.zeros(b, hkv, a_cap, d, device=DEV),
                torch.full((b, hkv, a_cap), -1, dtype=torch.int32, device=DEV),
                torch.full((b, hkv, a_cap), float("-inf"), device=DEV), torch.zeros(b, hkv, 1, dtype=torch.int32, device=DEV)]

    n0 = torch.zeros(b, dtype=torch.int32, device=DEV)

    def step(bufs, qq, kk, vv):
        out, lse = torch.ops.antkv.prefill_attention(qq, kk, vv, 0.25)
        torch.ops.antkv.window_flush(*bufs, n0, qq, kk, vv, out, lse, cb.centroids, cb.transform, cb.inverse, cb.mean,
                                     cb.centroids, cb.transform, cb.inverse, cb.mean, 0.25, 0.2, "ans")
        n1 = n0 + w
        wl = torch.ones(b, dtype=torch.int32, device=DEV)
        return torch.ops.antkv.decode_attention(qq[:, :, -1:], bufs[0], bufs[1], bufs[6], n1, bufs[2], bufs[3], bufs[4],
                                                kk[:, :, -1:], vv[:, :, -1:], wl, cb.centroids, cb.inverse, cb.mean,
                                                cb.centroids, cb.inverse, cb.mean, 0.25)[0]

    eager_bufs, comp_bufs = make(), make()
    expected = step(eager_bufs, q, k, v)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(comp_bufs, q, k, v)
    torch.testing.assert_close(got, expected)
    for a, e in zip(comp_bufs, eager_bufs):
        assert torch.equal(a, e)
    assert int((comp_bufs[4] >= 0).sum()) == b * hkv * math.ceil(0.2 * w)


@settings(max_examples=50, deadline=None)
@given(pairs=st.integers(1, 2048), capacity=st.integers(64, 1 << 20), ratio=st.sampled_from([0.0, 0.01, 0.1]),
       coded=st.integers(1, 64), sms=st.sampled_from([66, 132]))
def test_exact_programs_cover_the_anchor_share_and_fill_small_batches(pairs, capacity, ratio, coded, sms):
    """Beside a separate coded kernel (the pre-RoPE path): never fewer exact programs than the anchors' share of the
    coded splits; more at small batches (at most 8 per pair, ~2 per multiprocessor in all, >= 64 anchors each); one at
    large batches."""
    anchors = math.ceil(ratio * capacity)
    n = DA.exact_programs(pairs, capacity, anchors, coded, sms)
    share = max(1, math.ceil(anchors * coded / capacity)) if anchors else 1
    assert n >= share
    if n > share:
        assert n <= 8 and pairs * n <= 2 * sms and n <= math.ceil(anchors / 64)
    if pairs >= 2 * sms:
        assert n == share
