"""The pre-RoPE pair-layout decode kernel (kernels/rope_decode.py) against its PyTorch reference, and the reference
against the store's own semantics (Codebook.decode, then RoPE by slot). CPU: Triton interpreter."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEV, needs_triton  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from antkv_compile.config import get_preset  # noqa: E402
from antkv_compile.kernels import decode_attention as DA  # noqa: E402
from antkv_compile.kernels import rope_decode as RD  # noqa: E402
from antkv_compile.numerics.rope import InvFreqRope, rotate  # noqa: E402
from antkv_compile.numerics.rope_pairs import pair_transform  # noqa: E402
from antkv_compile.numerics.vq import Codebook  # noqa: E402
from numerics_helpers import codebook_with_transform  # noqa: E402

HYP = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    return float((a[finite] - b[finite]).norm() / b[finite].norm().clamp_min(1e-30))


def pair_codebook(heads: int, d: int, bits: str, stages: int, seed: int, shared: bool = False) -> Codebook:
    """A pre-RoPE key codebook in the RoPE-pair layout: random pair order per head, random centroids and mean."""
    g = _gen(seed)
    h = 1 if shared else heads
    tr, inv = pair_transform(torch.stack([torch.randperm(d // 2, generator=g) for _ in range(h)]))
    p = get_preset(bits)
    cents = torch.randn(stages, h, d // p.sub_dim, p.num_centroids, p.sub_dim, generator=g)
    cents = cents * torch.tensor([0.5**i for i in range(stages)])[:, None, None, None, None]
    return Codebook(cents, tr, inv, 0.3 * torch.randn(h, d, generator=g))


def inv_freq(d: int, theta: float = 10000.0, mult: float = 1.0) -> torch.Tensor:
    return mult / theta ** (torch.arange(0, d, 2).float() / d)


def rope_inputs(b, hkv, g, tq, d, n_cap, a_cap, w_cap, bits, stages, shared, dtype, seed, lengths=None,
                freq_mult=1.0, rope_scale=1.0):
    """Store buffers + tables for rope_decode_{triton,reference}: n_coded per sequence (default n_cap, n_cap // 2,
    ...), anchors at random coded positions, a window of w_cap with the Tq new tokens last."""
    gen = _gen(seed)
    cbk = pair_codebook(hkv, d, bits, stages, seed, shared)
    cbv = codebook_with_transform("1", hkv, d, seed + 1)
    tdt = torch.float32 if dtype == torch.float32 else torch.float16
    table, pairs, freq = RD.rope_key_tables(cbk, inv_freq(d, mult=freq_mult), tdt, DEV)
    q = (torch.randn(b, hkv * g, tq, d, generator=gen)).to(dtype).to(DEV)
    m = cbk.num_centroids
    ck = torch.randint(0, m, (b, hkv, n_cap, cbk.codes_per_vector), generator=gen).to(torch.uint8).to(DEV)
    cv = torch.randint(0, cbv.num_centroids, (b, hkv, n_cap, cbv.codes_per_vector), generator=gen).to(torch.uint8)
    if lengths is None:
        lengths = torch.tensor([max(0, n_cap // (1 + i)) for i in range(b)])
    n_coded = lengths.to(torch.int32).to(DEV)
    pos = torch.full((b, hkv, a_cap), -1, dtype=torch.int32)
    for bi in range(b):
        for hi in range(hkv):
            k_ = min(a_cap, int(lengths[bi]))
            pos[bi, hi, :k_] = torch.randperm(int(lengths[bi]), generator=gen)[:k_].int()
    ak = torch.randn(b, hkv, a_cap, d, generator=gen).to(dtype).to(DEV)
    av = torch.randn(b, hkv, a_cap, d, generator=gen).to(dtype).to(DEV)
    wk = torch.randn(b, hkv, w_cap, d, generator=gen).to(dtype).to(DEV)
    wv = torch.randn(b, hkv, w_cap, d, generator=gen).to(dtype).to(DEV)
    wl = torch.tensor([w_cap - (i % 2) for i in range(b)], dtype=torch.int32).to(DEV)
    pos = pos.to(DEV)
    return (q, ck, cv.to(DEV), DA.bits_from_positions(pos, n_cap), n_coded, ak, av, pos, wk, wv, wl, table, pairs,
            freq, cbv.centroids.to(tdt).to(DEV), cbv.inverse.to(DEV), cbv.mean.to(DEV), d**-0.5, rope_scale)


def test_tables_decode_what_the_store_decodes():
    """decode_rope_keys (the folded table, pairs, frequencies) = Codebook.decode + rotate by slot with InvFreqRope,
    what AnTKVLayerStore does for pre-RoPE keys; also with a shared codebook, two stages and attention scaling."""
    for shared, stages, scale_a in ((False, 1, 1.0), (True, 2, 1.25)):
        d, h, n, lo = 64, 2, 50, 1000
        cb = pair_codebook(h, d, "1", stages, 5, shared)
        f = inv_freq(d, theta=500.0)
        table, pairs, freq = RD.rope_key_tables(cb, f)
        codes = torch.randint(0, 256, (2, h, n, cb.codes_per_vector), generator=_gen(1)).to(torch.uint8)
        got = RD.decode_rope_keys(codes, table, pairs, freq, scale_a, lo)
        want = rotate(cb.decode(codes), *InvFreqRope(f, scale_a)(torch.arange(lo, lo + n)))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="RoPE-pair"):
        RD.rope_key_tables(codebook_with_transform("1", 2, 64, 1), inv_freq(64))


@needs_triton
@HYP
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.sampled_from([1, 3, 4]), tq=st.sampled_from([1, 2]),
       d=st.sampled_from([64, 128]), n_cap=st.sampled_from([1, 40, 130]), a_cap=st.sampled_from([0, 1, 5]),
       bits=st.sampled_from(["4", "2", "1", "0.375"]), stages=st.sampled_from([1, 1, 2]), shared=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), splits=st.sampled_from([None, (1, 1), (3, 2)]),
       block_n=st.sampled_from([16, 32, 64]), freq_mult=st.sampled_from([1.0, 1000.0]),
       rope_scale=st.sampled_from([1.0, 0.8]), seed=st.integers(0, 99))
def test_rope_decode_matches_reference(b, hkv, g, tq, d, n_cap, a_cap, bits, stages, shared, dtype, splits, block_n,
                                       freq_mult, rope_scale, seed):
    """Kernel = reference (decode + rotate + exact attention, anchors masked, + anchors + window, merged) over
    head_dim 64 / 128, G 1 / 3 / 4, sub_dim 2 / 4 / 8 / 16, one or two stages, several splits and block sizes;
    freq_mult 1000 turns the angles of slots <= 130 into angles of slots up to 130K (range reduction)."""
    args = rope_inputs(b, hkv, g, tq, d, n_cap, a_cap, 6, bits, stages, shared, dtype, seed, freq_mult=freq_mult,
                       rope_scale=rope_scale)
    out = torch.full_like(args[0], float("nan"))
    lse = torch.full(args[0].shape[:3], float("nan"), device=DEV)
    RD.rope_decode_triton(*args, splits=splits, out=(out, lse), poison=True, rope_block_n=block_n)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    assert not out.isnan().any() and not lse.isnan().any()
    assert _rel(out, ref_out) < 2 * TOL[dtype] and _rel(lse, ref_lse) < TOL[dtype]


@needs_triton
def test_rope_decode_edge_lengths_and_every_token_anchored():
    """Nothing coded, one coded token that is an anchor, a full sequence; then every coded token an anchor (the codes
    must not be read: the output is exact attention over anchors and window)."""
    lengths = torch.tensor([0, 1, 70])
    args = list(rope_inputs(3, 2, 4, 1, 64, 70, 3, 4, "1", 1, False, torch.float32, 5, lengths))
    args[7][1, :, 0] = 0  # token 0 of sequence 1 is an anchor
    args[3] = DA.bits_from_positions(args[7], 70)
    out, lse = RD.rope_decode_triton(*args, poison=True)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-5
    args = list(rope_inputs(1, 2, 3, 1, 64, 40, 40, 4, "1", 1, False, torch.float32, 6, torch.tensor([40])))
    args[7] = torch.arange(40, dtype=torch.int32, device=DEV).expand(1, 2, 40).contiguous()
    args[3] = DA.bits_from_positions(args[7], 40)
    out, _ = RD.rope_decode_triton(*args, poison=True, splits=(3, 2))
    from antkv_compile.numerics.attention import exact_attention, merge_partials

    q, ak, av, wk, wv = args[0], args[5], args[6], args[8], args[9]
    want = merge_partials([exact_attention(q, ak, av, args[17]), exact_attention(q, wk, wv, args[17])])[0]
    assert _rel(out, want) < 1e-5


def test_rope_decode_op_cpu_is_the_reference():
    """torch.ops.antkv.rope_decode_attention on CPU runs the reference; its fake gives the right shapes."""
    from antkv_compile.kernels import ops  # noqa: F401

    args = rope_inputs(2, 2, 3, 1, 64, 30, 2, 4, "1", 1, False, torch.float32, 9)
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.antkv.rope_decode_attention(*args)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    torch.library.opcheck(torch.ops.antkv.rope_decode_attention, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("threads", [256, 384, 512])
def test_rope_cuda_layout_fits_shared_memory_at_the_bench_shapes(threads):
    """The CUDA kernel's shared memory (two tables + per-warp group rotations and double-buffered codes) fits one
    block at 1 bit head_dim 128 with G*Tq = 4 and 8, and shape_reason accepts those shapes (no device needed)."""
    from antkv_compile.kernels import rope_decode_cuda as RC

    for rv, tq in ((4, 1), (8, 2)):
        lay = RC.layout(128, 16, 256, 8, 16, 256, 8, rv, tq, torch.float16, torch.float16, torch.float16, threads)
        assert lay["_smem"] <= RC.SMEM_LIMIT and lay["TABB"] >= threads // 32 * 8 * 128 * 4
    q = torch.zeros(1, 32, 1, 128, dtype=torch.float16)
    ck = torch.zeros(1, 8, 64, 16, dtype=torch.uint8)
    tab = torch.zeros(1, 8, 16, 256, 8, dtype=torch.float16)
    assert RC.shape_reason(q, ck, ck, tab, tab, 16, threads) is None
