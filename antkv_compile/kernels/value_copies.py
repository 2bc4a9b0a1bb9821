"""Which copy of the value table each coded token's centroid rows are read from (NOTES.md "Value-copy selection words").

The CUDA decode kernel (``coded_decode.cu``, ``antkv_coded_warp``) gathers value centroids with ``ldmatrix``:
one phase reads the rows of 8 consecutive coded tokens (an aligned group ``8g .. 8g + 7``) for one value
sub-space. At 1 bit the table fits twice in shared memory; copy 0 puts code ``k``'s row in bank group
``k % 4`` and copy 1 in group ``4 + k % 4`` (selection mode 2), up to a permutation shared by all rows of a phase.
A phase costs as many wavefronts as the most rows that fall in one group, so which copy each row reads matters:
the fixed choice ``row % 2`` costs 2.39 wavefronts per phase on average for random codes, the best choice 2.07.
(Mode 1, copy 1 hashed by ``k / 4 % 4``: 1.74 expected, but slower addresses in the kernel; measured and removed,
NOTES.md "Value-copy selection words".)

The best choice depends only on the codes, which are written once and read by every decode step, so it is
made when codes are written: one int16 *selection word* per coded token, bit ``sv`` = the copy of sub-space
``sv``'s row. For each group of 8 tokens and each sub-space the writer tries all 256 assignments and keeps the
one with the fewest rows in one group (ties: the fixed ``row % 2`` choice first, then the lowest mask).
The words are a speed hint only: the kernel's result does not depend on them.

:func:`select_reference` is the PyTorch reference (brute force); :func:`select_copies` the Triton kernel
(one program per group of 8 tokens and (sequence, KV head)), which writes the words of a token range in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import HAS_TRITON, cdiv, next_pow2

GROUP = 8  # tokens per ldmatrix phase
FIXED = 0b10101010  # the fixed choice: row r reads copy r % 2


MODES = (2,)


def bins(codes: Tensor, mode: int = 2) -> tuple[Tensor, Tensor]:
    """Bank group (0-7) of a code's row in copy 0 and copy 1, up to a permutation shared by the rows of a phase (the
    kernel's vchunk_off at 2 copies): copy 1 is copy 0 shifted by 4 groups."""
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES} (got {mode})")
    k = codes.to(torch.int64)
    return k & 3, 4 + (k & 3)


def phase_cost(codes: Tensor, masks: Tensor, mode: int = 2) -> Tensor:
    """Wavefronts of one ldmatrix phase: codes [..., 8] (one sub-space, 8 tokens), masks [...] (bit r: row r's
    copy) -> the most rows in one bank group [...]."""
    b0, b1 = bins(codes, mode)
    r = torch.arange(GROUP, device=codes.device)
    pick = (masks.to(torch.int64)[..., None] >> r) & 1
    group = torch.where(pick.bool(), b1, b0)
    return torch.nn.functional.one_hot(group, 8).sum(-2).amax(-1)


def select_reference(codes_v: Tensor, mode: int = 2) -> Tensor:
    """codes_v uint8 [..., n, CV] with n % 8 == 0 -> int16 [..., n] selection words (brute force over the 256
    assignments of every (group, sub-space))."""
    *lead, n, cv = codes_v.shape
    if n % GROUP:
        raise ValueError(f"select_reference takes whole groups of {GROUP} tokens (got {n})")
    rows = codes_v.reshape(*lead, n // GROUP, GROUP, cv).transpose(-1, -2)  # [..., G, CV, 8]
    masks = torch.arange(256, device=codes_v.device)
    cost = phase_cost(rows[..., None, :], masks.expand(*rows.shape[:-1], 256), mode)  # [..., G, CV, 256]
    key = cost * 256 + (masks ^ FIXED)
    best = key.argmin(-1)  # [..., G, CV]: the mask (keys are unique)
    r = torch.arange(GROUP, device=codes_v.device)
    bit = (best[..., None, :] >> r[:, None]) & 1  # [..., G, 8, CV]
    words = (bit << torch.arange(cv, device=codes_v.device)).sum(-1)
    return _as_int16(words.reshape(*lead, n))


def fixed_words(shape: tuple[int, ...], cv: int, device: torch.device | str) -> Tensor:
    """The words of the fixed choice (token t reads copy t % 2 in every sub-space): what the kernel does
    without selection words, and what a store's words are before its codes are written."""
    n = shape[-1]
    odd = (torch.arange(n, device=device) & 1).bool()
    words = torch.where(odd, (1 << cv) - 1, 0)
    return _as_int16(words).expand(shape).contiguous()


def _as_int16(words: Tensor) -> Tensor:
    w = words.to(torch.int64)
    return torch.where(w >= 1 << 15, w - (1 << 16), w).to(torch.int16)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _select_kernel(CODES, SEL, g0, n_hi, N_CAP, CV: tl.constexpr, CVP: tl.constexpr):
        t0 = (g0 + tl.program_id(0)) * 8
        pair = tl.program_id(1)
        sv = tl.arange(0, CVP)
        m = tl.arange(0, 256)
        p0 = tl.zeros((CVP, 256), dtype=tl.int32)  # rows per bank group, 4 bits each: copy 0 ...
        p1 = tl.zeros((CVP, 256), dtype=tl.int32)  # ... and copy 1
        for r in tl.static_range(8):
            ok = (sv < CV) & (t0 + r + sv * 0 < N_CAP)
            k = tl.load(CODES + (pair * N_CAP + t0 + r) * CV + sv, mask=ok, other=0).to(tl.int32)
            one = ((m >> r) & 1)[None, :] == 1
            p0 += tl.where(one, 0, (1 << (4 * (k & 3)))[:, None])
            p1 += tl.where(one, (1 << (4 * (k & 3)))[:, None], 0)
        cost = tl.zeros((CVP, 256), dtype=tl.int32)
        for j in tl.static_range(4):
            cost = tl.maximum(cost, tl.maximum((p0 >> (4 * j)) & 15, (p1 >> (4 * j)) & 15))
        key = cost * 256 + (m ^ 0b10101010)[None, :]
        best = (tl.min(key, axis=1) & 255) ^ 0b10101010  # [CVP]
        for r in tl.static_range(8):
            w = tl.sum(tl.where(sv < CV, ((best >> r) & 1) << sv, 0), axis=0)
            tl.store(SEL + pair * N_CAP + t0 + r, w.to(tl.int16), mask=t0 + r < tl.minimum(n_hi, N_CAP))


def select_copies(codes_v: Tensor, value_sel: Tensor, lo: int, hi: int, mode: int = 2) -> None:
    """Write the selection words of tokens [lo, hi) of every (sequence, KV head) into ``value_sel`` [B, Hkv,
    n_cap] int16, from ``codes_v`` [B, Hkv, n_cap, CV] uint8: the whole groups of 8 that the range touches are
    decided (their tokens past ``hi`` keep their words until they are written and the group is decided again)."""
    b, h, n_cap, cv = codes_v.shape
    if value_sel.shape != (b, h, n_cap) or value_sel.dtype != torch.int16:
        raise ValueError(f"value_sel must be int16 {(b, h, n_cap)} (got {value_sel.dtype} {tuple(value_sel.shape)})")
    if not codes_v.is_contiguous() or not value_sel.is_contiguous():
        raise ValueError("codes_v and value_sel must be contiguous")
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES} (got {mode})")
    if cv > 16:
        raise ValueError(f"selection words hold 16 sub-spaces (got {cv})")
    hi = min(hi, n_cap)
    if hi <= lo:
        return
    g0 = lo // GROUP
    groups = cdiv(hi, GROUP) - g0
    _select_kernel[(groups, b * h)](codes_v, value_sel, g0, hi, n_cap, CV=cv, CVP=next_pow2(cv), num_warps=4)


def selection_words(codes_v: Tensor, mode: int = 2) -> Tensor:
    """New selection words of every token of ``codes_v`` [B, Hkv, n, CV] (the whole array selected at once)."""
    words = fixed_words(tuple(codes_v.shape[:3]), codes_v.shape[3], codes_v.device)
    select_copies(codes_v.contiguous(), words, 0, codes_v.shape[2], mode)
    return words


__all__ = ["FIXED", "GROUP", "MODES", "bins", "fixed_words", "phase_cost", "select_copies", "select_reference",
           "selection_words"]
