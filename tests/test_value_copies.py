"""Value-copy selection words (kernels/value_copies.py): the Triton kernel against its brute-force reference,
the choice is optimal for every ldmatrix phase, it beats the fixed choice on random codes, range writes, and the
bank-group model matches the CUDA kernel's shared-memory layout (coded_decode.cu, vchunk_off at 2 copies)."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.kernels import value_copies as VC
from antkv_compile.kernels._common import HAS_TRITON, interpreting

needs_triton = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1")


def _masks(words: torch.Tensor, cv: int) -> torch.Tensor:
    """Selection words [..., n] -> per-phase masks [..., n / 8, CV] (bit r: row r's copy)."""
    w = words.to(torch.int64) & 0xFFFF
    w = w.reshape(*w.shape[:-1], -1, VC.GROUP)
    bits = (w[..., None] >> torch.arange(cv)) & 1  # [..., G, 8, CV]
    return (bits << torch.arange(VC.GROUP)[:, None]).sum(-2)


def _costs(codes: torch.Tensor, words: torch.Tensor, mode: int) -> torch.Tensor:
    """Wavefronts of every phase [..., G, CV] of codes [..., n, CV] read with these words."""
    *lead, n, cv = codes.shape
    rows = codes.reshape(*lead, n // VC.GROUP, VC.GROUP, cv).transpose(-1, -2)
    return VC.phase_cost(rows, _masks(words, cv), mode)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), groups=st.integers(1, 5), cv=st.sampled_from([8, 16]),
       m=st.sampled_from([4, 64, 256]), mode=st.sampled_from(VC.MODES), seed=st.integers(0, 2**16))
def test_reference_is_optimal_per_phase(b, h, groups, cv, m, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, m, (b, h, groups * VC.GROUP, cv), generator=gen, dtype=torch.uint8)
    words = VC.select_reference(codes, mode)
    got = _costs(codes, words, mode)
    rows = codes.reshape(b, h, groups, VC.GROUP, cv).transpose(-1, -2)
    every = VC.phase_cost(rows[..., None, :], torch.arange(256).expand(*rows.shape[:-1], 256), mode)
    assert torch.equal(got, every.amin(-1))
    assert (got <= _costs(codes, VC.fixed_words((b, h, groups * VC.GROUP), cv, "cpu"), mode)).all()


@pytest.mark.parametrize("mode, expected", [(2, 2.07)])
def test_selection_beats_the_fixed_choice_on_random_codes(mode, expected):
    """The expected wavefronts per phase for uniform codes: 2.39 fixed; selected 2.07 (mode 2)."""
    codes = torch.randint(0, 256, (4, 8, 512, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fixed = _costs(codes, VC.fixed_words((4, 8, 512), 16, "cpu"), mode).float().mean().item()
    best = _costs(codes, VC.select_reference(codes, mode), mode).float().mean().item()
    assert 2.3 < fixed < 2.48 and abs(best - expected) < 0.05, (fixed, best)


def test_fixed_words_are_row_parity():
    w = VC.fixed_words((2, 16), 16, "cpu")
    assert torch.equal(_masks(w, 16), torch.full((2, 2, 16), VC.FIXED))
    assert torch.equal(VC.fixed_words((1, 8), 8, "cpu")[0, 1:3], torch.tensor([0xFF, 0], dtype=torch.int16))


@needs_triton
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 45), cv=st.sampled_from([8, 16]),
       lo=st.integers(0, 44), span=st.integers(0, 30), mode=st.sampled_from(VC.MODES), seed=st.integers(0, 2**16))
def test_kernel_matches_reference_on_the_touched_groups(b, h, n, cv, lo, span, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (b, h, n, cv), generator=gen, dtype=torch.uint8)
    before = torch.randint(-2**15, 2**15, (b, h, n), generator=gen, dtype=torch.int16)
    words = before.clone()
    lo = min(lo, n)
    hi = min(n, lo + span)
    VC.select_copies(codes, words, lo, hi, mode)
    full = -(-n // 8) * 8
    padded = torch.cat([codes, codes.new_zeros(b, h, full - n, cv)], dim=2)  # the kernel reads no codes past n_cap
    ref = VC.select_reference(padded, mode)[..., :n]
    written = torch.zeros(n, dtype=torch.bool)
    if hi > lo:  # the whole groups from lo's, up to hi
        written[lo // 8 * 8:hi] = True
    assert torch.equal(words[..., written], ref[..., written])
    assert torch.equal(words[..., ~written], before[..., ~written])  # past hi and outside the groups: untouched


@pytest.mark.parametrize("mode", VC.MODES)
def test_bank_groups_model_the_kernels_layout(mode):
    """vchunk_off (coded_decode.cu) at NCOPY 2 (GPC 4): chunk j of code k in copy c sits in bank group
    c * 4 + ((j ^ k) % 4) (copy 1 is read at copy 0's offset + 4 groups: the same); two rows of one phase (same
    j) collide iff value_copies.bins says so."""

    def group(j, k, c):  # the kernel's formula, byte offset / 16 mod 8
        cv, nch = 16, 1
        return (k * (8 * cv * nch // 4) + ((j // 4) << 3) + c * 4 + ((j ^ k) & 3)) % 8

    b0, b1 = VC.bins(torch.arange(256), mode)
    for j in range(16):
        for c, bins in ((0, b0), (1, b1)):
            for k1, k2 in itertools.combinations(range(0, 256, 7), 2):
                assert (group(j, k1, c) == group(j, k2, c)) == bool(bins[k1] == bins[k2])
            assert {group(j, k, c) for k in range(256)} == set(range(4 * c, 4 * c + 4))


@needs_triton
def test_selection_words_select_the_whole_array():
    codes = torch.randint(0, 256, (1, 2, 24, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert torch.equal(VC.selection_words(codes), VC.select_reference(codes))


def test_bad_arguments_are_refused():
    codes = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="int16"):
        VC.select_copies(codes, torch.zeros(1, 1, 16, dtype=torch.int32), 0, 16)
    with pytest.raises(ValueError, match="whole groups"):
        VC.select_reference(codes[:, :, :12])
    with pytest.raises(ValueError, match="mode"):
        VC.select_copies(codes, torch.zeros(1, 1, 16, dtype=torch.int16), 0, 16, mode=3)
