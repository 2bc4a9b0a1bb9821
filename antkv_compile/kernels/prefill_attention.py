"""Prefill attention (causal, GQA, FlashAttention tiling) with each key token's Anchor Score.

References: :func:`antkv_compile.numerics.attention.exact_attention` with a causal mask (out, lse) and
:func:`antkv_compile.numerics.anchor_score.anchor_scores` with ``kind="ans"`` (the score of key j
summed over the query rows i >= j and the G query heads of its KV head):

    AnS_j = sum_{g, i} A_ij * sqrt( coef^2 |v_j - o_i|^2 + 2 coef (v_j - o_i).dv_j + |dv_j|^2 ),
    A_ij = exp(scale q_i.k_j - lse_i),  coef = scale q_i.dk_j

with dk, dv the token's quantization residuals (x_hat - x). The per-pair terms need the *final* o_i and
lse_i, so the scores cannot ride along the forward loop; two schedules, both here:

* two-pass (default): the forward kernel writes out and lse; a second, key-block-stationary kernel
  keeps k, v, dk, dv of a key block (prepared once, as MMA operands in shared memory) and walks the query
  blocks that see it (all G heads), with four products per tile (q.k, q.dk, o.v, o.dv); |o_i|^2 comes per
  row beside lse, both loaded one tile ahead, and the tiles add up in a 2-D accumulator summed once at the
  end. Deterministic, no atomics.
* fused: one query-block-stationary kernel runs the forward loop, then walks the same key blocks again
  with o_i, lse_i in registers and adds each tile's column sums into the scores with atomics.

Either way the score pass does four QK-shaped products per tile against the forward's two, so prefill
with exact scores costs about three forward passes (the floor, see NOTES.md). Measured on an H100 (fp16,
Llama-3-8B heads): two-pass 3.60 ms at 8K / 55.0 ms at 32K (fused 10.4 / 170 ms); the forward alone runs
at 450-495 TFLOP/s (SDPA flash: 314-350), attention + exact scores = 2.05-2.2x SDPA's prefill.

Row sampling (``row_stride`` R > 1, the stores' default R = G for long windows): rows more than ``band`` past
a key are read every R-th only, weighted R (numerics.anchor_score.row_sample_weights); attention + scores
1.18x / 1.11x SDPA at R = 4, 1.04x / 0.93x at R = 8 (NOTES.md "Anchor Scores").
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.anchor_score import anchor_scores as anchor_scores_ref
from ..numerics.attention import causal_mask, exact_attention
from ._common import HAS_TRITON, LOG2E, can_launch, cdiv, dot_dtype, dot_precision, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kt, lo, hi, offs_m, T, qk_scale,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr,
                   PREC: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kmask = offs_n < T
            k = tl.load(k_base + offs_n[None, :] * s_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
            qk = tl.dot(q, k.to(DOT), input_precision=PREC) * qk_scale
            if MASKED:
                qk = tl.where((offs_n[None, :] <= offs_m[:, None]) & kmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * s_kt + offs_d[None, :], mask=kmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _ans_terms(q, o, o2, lse2, k_t, dk_t, v_t, dv_t, v2, dv2, vdv, qk_scale, causal_ok, PREC: tl.constexpr):
        """A_ij * ||...|| over one (query block, key block) tile, 0 where not causal_ok (None: every pair counts;
        rows past the end read lse = +inf, so their A is 0 anyway). The key block comes prepared by _key_block:
        dk_t = scale dk, v_t = -2 v, dv_t = -2 dv, vdv = 2 v.dv (fewer operations per pair)."""
        s = tl.dot(q, k_t, input_precision=PREC)
        a = tl.exp2(s * qk_scale - lse2[:, None])
        if causal_ok is not None:
            a = tl.where(causal_ok, a, 0.0)
        coef = tl.dot(q, dk_t, input_precision=PREC)  # scale q.dk
        # |v - o|^2 (a rounding below 0 only moves norm2, which is clamped)
        dist2 = tl.dot(o, v_t, input_precision=PREC) + (v2[None, :] + o2[:, None])
        cross2 = tl.dot(o, dv_t, input_precision=PREC) + vdv[None, :]  # 2 (v - o).dv
        norm2 = tl.maximum(coef * (coef * dist2 + cross2) + dv2[None, :], 0.0)
        return a * tl.sqrt(norm2)

    @triton.jit
    def _key_block(k, dk, v, dv, scale, DOT: tl.constexpr):
        """The operands of _ans_terms from a key block's k, dk, v, dv (any dtype, [D, BLOCK_N])."""
        v_f, dv_f = v.to(tl.float32), dv.to(tl.float32)
        v2 = tl.sum(v_f * v_f, axis=0)
        dv2 = tl.sum(dv_f * dv_f, axis=0)
        vdv = 2.0 * tl.sum(v_f * dv_f, axis=0)
        return (k.to(DOT), (dk.to(tl.float32) * scale).to(DOT), (-2.0 * v_f).to(DOT), (-2.0 * dv_f).to(DOT),
                v2, dv2, vdv)

    @triton.jit
    def _prefill_fwd_kernel(
        Q, K, V, O, LSE,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_lb, s_lh,
        T, HQ, G, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
        pid_bh = tl.program_id(1)
        b = pid_bh // HQ
        hq = pid_bh % HQ
        hk = hq // G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        mmask = offs_m < T
        q_ptrs = Q + b * s_qb + hq * s_qh + offs_m[:, None] * s_qt + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mmask[:, None], other=0.0).to(DOT)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_kb + hk * s_kh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        lo_diag = pid_m * BLOCK_M
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kt, 0, lo_diag, offs_m, T, qk_scale,
                                   False, BLOCK_N, D, DOT, PREC)
        hi = tl.minimum(lo_diag + BLOCK_M, T)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kt, lo_diag, hi, offs_m, T, qk_scale,
                                   True, BLOCK_N, D, DOT, PREC)
        out = acc / l_i[:, None]
        lse2 = m_i + tl.log2(l_i)
        tl.store(O + b * s_qb + hq * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mmask[:, None])
        tl.store(LSE + b * s_lb + hq * s_lh + offs_m, lse2 * 0.6931471805599453, mask=mmask)

    @triton.jit
    def _stats(l_base, o2_base, offs_m, T, lse_shift):
        """lse of rows offs_m in log2 units minus ``lse_shift`` (log2 of the rows' weight), and their |o|^2. Rows past
        the end and rows that saw no key (lse = -inf) read lse2 = +inf, so their A is 0."""
        mmask = offs_m < T
        lse = tl.load(l_base + offs_m, mask=mmask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634 - lse_shift)
        return lse2, tl.load(o2_base + offs_m, mask=mmask, other=0.0)

    @triton.jit
    def _qo(q_base, o_base, s_qt, offs_m, T, D: tl.constexpr, DOT: tl.constexpr):
        offs_d = tl.arange(0, D)
        mmask = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * s_qt + offs_d[None, :], mask=mmask[:, None], other=0.0)
        o = tl.load(o_base + offs_m[:, None] * s_qt + offs_d[None, :], mask=mmask[:, None], other=0.0)
        return q.to(DOT), o.to(DOT)

    @triton.jit
    def _ans_rows(acc, q_base, o_base, l_base, o2_base, s_qt, lo, hi, T, offs_n, k_t, dk_t, v_t, dv_t, v2, dv2, vdv,
                  qk_scale, lse_shift, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr, STEP: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] += the tiles of the rows lo, lo + STEP, ... < hi, each pair weighted
        2^lse_shift (causal mask on the diagonal blocks). The rows' lse and |o|^2 are loaded one tile ahead."""
        rows = tl.arange(0, BLOCK_M) * STEP
        lse2_n, o2_n = _stats(l_base, o2_base, lo + rows, T, lse_shift)
        for start_m in range(lo, hi, BLOCK_M * STEP):
            offs_m = start_m + rows
            lse2, o2 = lse2_n, o2_n
            lse2_n, o2_n = _stats(l_base, o2_base, offs_m + BLOCK_M * STEP, T, lse_shift)
            q, o = _qo(q_base, o_base, s_qt, offs_m, T, D, DOT)
            if MASKED:
                acc += _ans_terms(q, o, o2, lse2, k_t, dk_t, v_t, dv_t, v2, dv2, vdv, qk_scale,
                                  offs_n[None, :] <= offs_m[:, None], PREC)
            else:
                acc += _ans_terms(q, o, o2, lse2, k_t, dk_t, v_t, dv_t, v2, dv2, vdv, qk_scale, None, PREC)
        return acc

    @triton.jit
    def _ans_rows_banded(acc, q_base, o_base, l_base, o2_base, s_qt, lo, hi, T, offs_n, k_t, dk_t, v_t, dv_t, v2,
                         dv2, vdv, qk_scale, g, BAND, R: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr):
        """Every row of [lo, hi), each pair weighted as numerics.anchor_score.row_sample_weights says: 1 within
        BAND rows of its key, R on the rows (i + g) % R == 0 beyond it, 0 elsewhere."""
        rows = tl.arange(0, BLOCK_M)
        lse2_n, o2_n = _stats(l_base, o2_base, lo + rows, T, 0.0)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + rows
            lse2, o2 = lse2_n, o2_n
            lse2_n, o2_n = _stats(l_base, o2_base, offs_m + BLOCK_M, T, 0.0)
            q, o = _qo(q_base, o_base, s_qt, offs_m, T, D, DOT)
            lag = offs_m[:, None] - offs_n[None, :]
            sampled = ((offs_m + g) % R) == 0
            w = tl.where(lag < BAND, 1.0, tl.where(sampled[:, None], R * 1.0, 0.0))
            terms = _ans_terms(q, o, o2, lse2, k_t, dk_t, v_t, dv_t, v2, dv2, vdv, qk_scale, lag >= 0, PREC)
            acc += terms * w
        return acc

    @triton.jit
    def _ans_scores_kernel(
        Q, K, V, DK, DV, O, LSE, O2, SC,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_lb, s_lh, s_sb, s_sh,
        T, TK, HKV, G, qk_scale, scale, BAND,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
        R: tl.constexpr,
    ):
        """Scores of the TK keys over the T >= TK queries aligned with them (query i reads keys j <= i); R > 1:
        rows sampled beyond BAND (numerics.anchor_score.row_sample_weights). O2 holds |o_i|^2 of each row (as
        stored). The tiles add up in a [BLOCK_M, BLOCK_N] accumulator, summed over its rows once at the end.
        One flat grid, key block major: the first key blocks of every (sequence, head), which see the most rows,
        start first (longest first; head-major order left the last heads' longest programs to the end)."""
        n_bh = tl.num_programs(0) // tl.cdiv(TK, BLOCK_N)  # (sequence, KV head) pairs
        pid_bh = tl.program_id(0) % n_bh
        pid_n = tl.program_id(0) // n_bh
        b = pid_bh // HKV
        hk = pid_bh % HKV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < TK
        offs_d = tl.arange(0, D)
        kv_off = b * s_kb + hk * s_kh + offs_n[None, :] * s_kt + offs_d[:, None]  # [D, BLOCK_N] (transposed)
        k_t, dk_t, v_t, dv_t, v2, dv2, vdv = _key_block(
            tl.load(K + kv_off, mask=nmask[None, :], other=0.0), tl.load(DK + kv_off, mask=nmask[None, :], other=0.0),
            tl.load(V + kv_off, mask=nmask[None, :], other=0.0), tl.load(DV + kv_off, mask=nmask[None, :], other=0.0),
            scale, DOT)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        n_lo = pid_n * BLOCK_N
        m_lo = (n_lo // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(n_lo + BLOCK_N, BLOCK_M) * BLOCK_M, T)  # from here on rows see every key
        # rows [m_lo, m_band) hold every pair within BAND of a key of this block (R > 1: weighted elementwise);
        # from m_band on, only the sampled rows, each pair weighted R (through lse: A * R = 2^(s - lse2 + log2 R))
        m_band = tl.minimum(tl.cdiv(n_lo + BLOCK_N - 1 + BAND, BLOCK_M) * BLOCK_M, T)
        for g in range(G):
            hq = hk * G + g
            q_base = Q + b * s_qb + hq * s_qh
            o_base = O + b * s_qb + hq * s_qh
            l_base = LSE + b * s_lb + hq * s_lh
            o2_base = O2 + b * s_lb + hq * s_lh
            if R == 1:
                acc = _ans_rows(acc, q_base, o_base, l_base, o2_base, s_qt, m_lo, m_full, T, offs_n, k_t, dk_t, v_t,
                                dv_t, v2, dv2, vdv, qk_scale, 0.0, True, BLOCK_M, D, DOT, PREC, 1)
                acc = _ans_rows(acc, q_base, o_base, l_base, o2_base, s_qt, m_full, T, T, offs_n, k_t, dk_t, v_t,
                                dv_t, v2, dv2, vdv, qk_scale, 0.0, False, BLOCK_M, D, DOT, PREC, 1)
            else:
                acc = _ans_rows_banded(acc, q_base, o_base, l_base, o2_base, s_qt, m_lo, m_band, T, offs_n, k_t,
                                       dk_t, v_t, dv_t, v2, dv2, vdv, qk_scale, g, BAND, R, BLOCK_M, D, DOT, PREC)
                first = m_band + (R - (m_band + g) % R) % R
                acc = _ans_rows(acc, q_base, o_base, l_base, o2_base, s_qt, first, T, T, offs_n, k_t, dk_t, v_t,
                                dv_t, v2, dv2, vdv, qk_scale, tl.log2(R * 1.0), False, BLOCK_M, D, DOT, PREC, R)
        tl.store(SC + b * s_sb + hk * s_sh + offs_n, tl.sum(acc, axis=0), mask=nmask)


def _check(q: Tensor, k: Tensor, fewer_keys: bool = False) -> tuple[int, int, int, int, int]:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bad_t = k.shape[2] > t if fewer_keys else k.shape[2] != t
    if hq % hkv or bad_t or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"prefill attention needs q [B, Hq, T, D], k/v [B, Hkv, T, D]: got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    return b, hq, hkv, t, d


def _default_blocks(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    return (128, 64, 8, 3) if d >= 128 else (128, 64, 4, 3)


def _score_blocks(tk: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the score kernel: 128-key blocks over two warpgroups with
    3-stage row tiles for long windows (measured best at 8K and 32K, NOTES.md "Anchor Scores"; 224 of the 227 KB of shared
    memory at head_dim 128), a block the size of a decode flush's keys otherwise; 32-key blocks above head_dim 128
    (the four key-block operands and the double-buffered q / o tiles must fit in shared memory)."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if d > 128:
        return 64, 32, 4, 2
    if tk > 64:
        return 64, 128, 8, 3
    return (64, 32, 4, 2) if tk <= 32 else (64, 64, 4, 2)


def prefill_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, *, blocks=None,
                             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Causal GQA attention of T queries over the same T keys -> (out q.dtype, lse fp32 [B, Hq, T])."""
    require_triton()
    b, hq, hkv, t, d = _check(q, k)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if out is None:
        out_, lse = torch.empty_like(q), torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    else:
        out_, lse = out
    out = out_
    bm, bn, nw, ns = blocks or _default_blocks(d, q.dtype)
    if b * hq * t == 0:
        return out, lse
    grid = (cdiv(t, bm), b * hq)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        t, hq, hq // hkv, float(scale) * LOG2E,
        D=d, BLOCK_M=bm, BLOCK_N=bn, DOT=dot_dtype(q.dtype), PREC=dot_precision(q.dtype),
        num_warps=nw, num_stages=ns,
    )
    return out, lse


def anchor_scores_triton(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, out: Tensor, lse: Tensor,
                         scale: float, *, blocks=None, scores: Tensor | None = None, row_stride: int = 1,
                         band: int = 256, o2: Tensor | None = None) -> Tensor:
    """Anchor Scores ("ans") of Tk keys over the Tq >= Tk queries aligned with them (query i reads keys
    j <= i; a window flush scores its oldest Tk tokens over all the window's queries) -> [B, Hkv, Tk].

    out/lse are the final attention output and log-normalizer of each query row. ``row_stride`` R > 1 reads
    the rows more than ``band`` past a key only every R-th (weighted R): about R times less work on a long
    prefill (:func:`antkv_compile.numerics.anchor_score.row_sample_weights`)."""
    require_triton()
    if row_stride < 1 or band < 1:
        raise ValueError(f"row_stride and band must be >= 1, got {row_stride}, {band}")
    b, hq, hkv, t, d = _check(q, k, fewer_keys=True)
    tk = k.shape[2]
    if scores is None:
        scores = torch.empty(b, hkv, tk, dtype=torch.float32, device=q.device)
    if b * hkv * tk == 0:
        return scores
    q, out = q.contiguous(), out.contiguous()
    k, v = k.contiguous(), v.contiguous()
    dk, dv = dk.to(k.dtype).contiguous(), dv.to(k.dtype).contiguous()
    lse = lse.float().contiguous()
    if out.stride() != q.stride():
        out = out.reshape(q.shape).contiguous()
    if o2 is None:
        o2 = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32).square_()
    o2 = o2.float().contiguous()
    if o2.shape != lse.shape:
        raise ValueError(f"o2 must be |out|^2 per row, shaped like lse {tuple(lse.shape)}: got {tuple(o2.shape)}")
    bm, bn, nw, ns = blocks or _score_blocks(tk, d, q.dtype)
    grid = (cdiv(tk, bn) * b * hkv,)
    _ans_scores_kernel[grid](
        q, k, v, dk, dv, out, lse, o2, scores,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1),
        t, tk, hkv, hq // hkv, float(scale) * LOG2E, float(scale), int(band),
        D=d, BLOCK_M=bm, BLOCK_N=bn, DOT=dot_dtype(q.dtype), PREC=dot_precision(q.dtype), R=int(row_stride),
        num_warps=nw, num_stages=ns,
    )
    return scores


def prefill_attention_ans_triton(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, scale: float,
                                 *, row_stride: int = 1, band: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, Anchor Scores): forward + key-stationary score pass (rows sampled beyond ``band`` with
    ``row_stride`` > 1). (A fused one-kernel schedule measured 2x slower and was removed; NOTES.md.)"""
    out, lse = prefill_attention_triton(q, k, v, scale)
    return out, lse, anchor_scores_triton(q, k, v, dk, dv, out, lse, scale, row_stride=row_stride, band=band)


# ---------------------------------------------------------------------------------------------- references
def prefill_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    out, lse = exact_attention(q, k, v, scale, causal_mask(pos, pos))
    return out.to(q.dtype), lse


def anchor_scores_reference(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, out: Tensor, lse: Tensor,
                            scale: float, row_stride: int = 1, band: int = 256) -> Tensor:
    pos = torch.arange(q.shape[2], device=q.device)
    return anchor_scores_ref(q, k, v, out, lse, scale, kind="ans", k_hat=k.float() + dk.float(),
                             v_hat=v.float() + dv.float(), mask=causal_mask(pos, pos[:k.shape[2]]),
                             row_stride=row_stride, band=band)


def prefill_attention_ans_reference(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, scale: float,
                                    row_stride: int = 1, band: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    out, lse = exact_attention(q, k, v, scale, causal_mask(pos, pos))
    scores = anchor_scores_reference(q, k, v, dk, dv, out, lse, scale, row_stride, band)
    return out.to(q.dtype), lse, scores


def prefill_attention_ans(q, k, v, dk, dv, scale, **kw):
    if can_launch(q):
        return prefill_attention_ans_triton(q, k, v, dk, dv, scale, **kw)
    return prefill_attention_ans_reference(q, k, v, dk, dv, scale)
