"""Decode attention on the AnTKV store: split-K (flash-decoding) over the VQ codes, exact attention over
the anchors and the full-precision window, merged by log-sum-exp.

Reference: what :meth:`AnTKVLayerStore._coded_partials` plus the window part of ``attend`` compute,
i.e. ``merge_partials([lut_attention(coded, not anchor), exact_attention(anchors),
exact_attention(window, causal)])`` (:func:`decode_attention_reference` below builds exactly that
from the store buffers, with per-sequence lengths).

Store layout the kernel reads (per layer; fixed capacity, so shapes never depend on data):

    q            [B, Hq, Tq, D]          the new queries (query head h reads KV head h // G)
    codes_k/v    [B, Hkv, N, Ck/Cv]      uint8 codes of every coded token (anchors too)
    anchor_bits  [B, Hkv, ceil(N/32)]    int32 bitmask: bit (n % 32) of word n // 32 set = token n is an
                                         anchor (read from the anchors, never from its codes)
    n_coded      [B] int32               coded tokens of each sequence (tokens >= n_coded are ignored)
    anchor_k/v   [B, Hkv, A, D]          full-precision anchors, anchor_pos [B, Hkv, A] int32 (-1 = empty)
    win_k/v      [B, Hkv, W, D]          full-precision window *including the Tq new tokens*,
    win_len      [B] int32               of which the first win_len[b] are valid; query t (of Tq) sees
                                         window entries j <= win_len[b] - Tq + t (causal)
    codebooks    cent [stages, H_cb, S, M, sub], inverse [H_cb, D, D], mean [H_cb, D] for keys and values

Algorithm (three launches: prologue, partials, merge):

* prologue, one program per (sequence, KV head): the queries in the key coding space,
  q' = q @ inverse_k^T and the bias q.mean_k (both times scale * log2 e).
* partials, grid (B * Hkv, P) with P = P_coded + P_exact; every program packs the G query heads of its
  KV head (times Tq) into the rows of one tile (padded to 16 for the tensor cores).
  - coded programs: each block of tokens is dequantized *in coding space* by gathering one centroid per
    (token, sub-space) -- a 16-byte vector at 1 bit -- and the logits are one tensor-core product
    q' . k'. This is the lookup table evaluated through a product: ``LUT[c, code] = q'_c . centroid[c,
    code]`` summed over c equals ``q' . k'``; gathering centroids costs one random access per
    (token, sub-space) instead of one per (token, sub-space, query row). Values are accumulated in
    coding space the same way (gather, not a per-centroid histogram; NOTES.md has both costs). Coded
    tokens whose anchor bit is set are masked out.
  - exact programs: exact attention over a slice of the anchor slots (empty slots masked); the first one
    also attends the window (causal).
* merge, one program per (sequence, KV head): log-sum-exp of the coded partials, the value inverse
  transform + mean applied once, then the merge with the exact partials.

v3 (NOTES.md): by default the merge runs in the last-arriving split program of each head (arrival counter
reset by the prologue; ``merge="triton"`` keeps the separate launch), and keys are scored through a per-query
fp32 lookup table (``key_lut``, when G*Tq <= 8) built by a small kernel after the prologue. Measured v3:
0.65-1.1x FP16 SDPA at 1 bit, 1.2-1.8x at 0.375 bit (128K); the split loop is still latency-bound.
Measured v2 (H100, NOTES.md): correct, but not fast. The split kernel is latency-bound per program
(~0.7 random 16-byte gathers per clock per SM, where the same L1 sustains 2.8 in a tight loop, and
5-6 % of HBM bandwidth), and the merge launch costs a fixed ~90-200 us at small batch: 0.25-0.9x
FP16 SDPA at 1 bit, 0.26-1.17x at 0.375 bit. The defaults below are the best measured configuration.

v4 (NOTES.md, options of DecodePlan, the default unchanged until measured): ``prefetch`` (next block's codes
loaded one iteration ahead; 2 = value gathers issued with the key gathers), ``streams=2`` (two token ranges
interleaved per program), ``lean`` (key codes as 32-bit words, one token per thread, no shuffles),
``values_b`` (the value product as p^T @ vc with vc as the B operand: one shared-memory round trip per block
instead of 16 barrier-separated rounds), ``affine`` (coded chunks claimed per multiprocessor via %smid, so
the programs resident on one SM share one head's tables in L1), ``probe_tables`` (timing probe, not exact).

v5 (NOTES.md): ``coded="auto"`` (the default, ``ANTKV_DECODE_CODED`` overrides it) runs the coded split programs as
the CUDA C++ kernel of ``coded_decode.cu`` (both tables in shared memory, 2.5x the lean loop at 1 bit, 128K B=32)
wherever it supports the call; the Triton loop stays the implementation under the interpreter and the fallback.

No host synchronisation and no data-dependent shapes: the per-sequence lengths are read on the device,
each split covers ``ceil(n_coded[b] / P_coded)`` tokens, so the launch is CUDA-graph safe.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from ..numerics.attention import causal_mask, exact_attention, lut_attention, merge_partials
from ..numerics.vq import Codebook
from ._common import (
    HAS_TRITON, LN2, LOG2E, can_launch, cdiv, dot_dtype, dot_precision, interpreting, next_pow2, require_triton,
    sm_count, tl, triton,
)

if HAS_TRITON:

    @triton.jit
    def _load_rows(Q, b, h, s_qb, s_qh, s_qt, G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr,
                   D: tl.constexpr):
        rows = tl.arange(0, R_PAD)
        rg = rows // TQ
        rt = rows % TQ
        rvalid = rows < G * TQ
        offs_d = tl.arange(0, D)
        ptrs = Q + b * s_qb + (h * G + rg)[:, None] * s_qh + rt[:, None] * s_qt + offs_d[None, :]
        return tl.load(ptrs, mask=rvalid[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _dequant(CODES, code_base, offs_n, nmask, C: tl.constexpr, CENT, hc, HCB,
                 S: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, CACHE: tl.constexpr,
                 SUBMAJOR: tl.constexpr):
        """Coding-space vectors [BLOCK_N, D] of the tokens offs_n: one centroid gather per sub-space.

        SUBMAJOR builds the gather as [S, BLOCK_N, SUB], so the lanes of one load instruction walk tokens
        of the same sub-space (one 4 KB table at 1 bit) instead of 32 different tables: fewer distinct
        cache lines per warp-wide gather."""
        s_idx = tl.arange(0, S)
        e_idx = tl.arange(0, SUB)
        if SUBMAJOR:
            acc = tl.zeros([S, BLOCK_N, SUB], tl.float32)
            for st in tl.static_range(STAGES):
                code = tl.load(CODES + code_base + offs_n[None, :] * C + st * S + s_idx[:, None],
                               mask=nmask[None, :], other=0).to(tl.int32)  # [S, BLOCK_N]
                ptr = (CENT + ((st * HCB + hc) * S + s_idx[:, None, None]) * (M * SUB) + code[:, :, None] * SUB
                       + e_idx[None, None, :])
                if STAGES == 1:
                    xs = tl.load(ptr, cache_modifier=CACHE).to(DOT)
                else:
                    acc += tl.load(ptr, cache_modifier=CACHE).to(tl.float32)
            if STAGES > 1:
                xs = acc.to(DOT)
            x = tl.permute(xs, (1, 0, 2))
        elif STAGES == 1:
            code = tl.load(CODES + code_base + offs_n[:, None] * C + s_idx[None, :], mask=nmask[:, None],
                           other=0).to(tl.int32)
            ptr = CENT + (hc * S + s_idx[None, :, None]) * (M * SUB) + code[:, :, None] * SUB + e_idx[None, None, :]
            x = tl.load(ptr, cache_modifier=CACHE).to(DOT)
        else:
            acc = tl.zeros([BLOCK_N, S, SUB], tl.float32)
            for st in tl.static_range(STAGES):
                code = tl.load(CODES + code_base + offs_n[:, None] * C + st * S + s_idx[None, :],
                               mask=nmask[:, None], other=0).to(tl.int32)
                ptr = (CENT + ((st * HCB + hc) * S + s_idx[None, :, None]) * (M * SUB) + code[:, :, None] * SUB
                       + e_idx[None, None, :])
                acc += tl.load(ptr, cache_modifier=CACHE).to(tl.float32)
            x = acc.to(DOT)
        return tl.reshape(x, [BLOCK_N, D])

    @triton.jit
    def _store_partial(PO, PL, pid_bh, pid_s, P, acc, m_i, l_i, RV: tl.constexpr, R_PAD: tl.constexpr,
                       D: tl.constexpr, R_STRIDE: tl.constexpr):
        """Normalized partial output and its log2-sum-exp; only the RV = G*Tq real rows are written."""
        rows = tl.arange(0, R_PAD)
        offs_d = tl.arange(0, D)
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        base = (pid_bh * P + pid_s) * R_STRIDE
        rmask = rows < RV
        tl.store(PO + (base + rows[:, None]) * D + offs_d[None, :], out, mask=rmask[:, None])
        tl.store(PL + base + rows, lse2, mask=rmask)

    @triton.jit
    def _online_update(logits, m_i, l_i, acc):
        """One online-softmax step in base 2: returns (p, alpha, m_new, l_new); caller rescales acc."""
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(logits - m_use[:, None])
        l_new = l_i * alpha + tl.sum(p, axis=1)
        return p, alpha, m_new, l_new

    @triton.jit
    def _decode_lut_kernel(QC, CENT, LUT, HKV, HCB, CB_PER_HEAD, R_PAD: tl.constexpr, D: tl.constexpr,
                           S: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr, ST: tl.constexpr, R_L: tl.constexpr):
        """Per-query key lookup table, once per (sequence, KV head, stage, sub-space):
        LUT[bh, st, s, m, r] = q'_r[s*SUB:(s+1)*SUB] . centroid[st, s, m] (fp32, scale*log2 e included), so the
        split loop sums S gathered 16-byte rows [R_L] per token instead of dequantizing and multiplying."""
        pid_bh = tl.program_id(0)
        pid_ss = tl.program_id(1)
        st = pid_ss // S
        s = pid_ss % S
        hc = (pid_bh % HKV) * CB_PER_HEAD
        m = tl.arange(0, M)
        r = tl.arange(0, R_L)
        e = tl.arange(0, SUB)
        q = tl.load(QC + pid_bh * R_PAD * (D + 1) + r[:, None] * D + s * SUB + e[None, :])  # [R_L, SUB]
        c = tl.load(CENT + ((st * HCB + hc) * S + s) * (M * SUB) + m[:, None] * SUB + e[None, :]).to(tl.float32)
        lut = tl.sum(c[:, None, :] * q[None, :, :], axis=2)  # [M, R_L]
        tl.store(LUT + (pid_bh * (ST * S) + pid_ss) * (M * R_L) + m[:, None] * R_L + r[None, :], lut)

    @triton.jit
    def _decode_prologue_kernel(Q, INV_K, MEAN_K, QC, CNT, s_qb, s_qh, s_qt, HKV, CBK_PER_HEAD, qk_scale,
                                G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
                                PREC: tl.constexpr, CLAIM=None, NR=1, NR_PAD: tl.constexpr = 0):
        """Queries into the key coding space, once per (sequence, KV head): QC[r] = (q @ inv_k^T, q.mean_k),
        both times scale*log2(e). Kept out of the split kernel: the [D, D] operand would set its register
        and shared-memory peak (and be re-read by every split)."""
        pid_bh = tl.program_id(0)
        b = pid_bh // HKV
        h = pid_bh % HKV
        offs_d = tl.arange(0, D)
        rows = tl.arange(0, R_PAD)
        q = _load_rows(Q, b, h, s_qb, s_qh, s_qt, G, TQ, R_PAD, D)
        hk = h * CBK_PER_HEAD
        inv_t = tl.load(INV_K + hk * D * D + offs_d[:, None] + offs_d[None, :] * D)  # [d, e] = inv[e, d]
        qc = tl.dot(q, inv_t, input_precision=PREC) * qk_scale
        mean = tl.load(MEAN_K + hk * D + offs_d)
        bias = tl.sum(q * mean[None, :], axis=1) * qk_scale
        base = pid_bh * R_PAD * (D + 1)
        tl.store(QC + base + rows[:, None] * D + offs_d[None, :], qc)
        tl.store(QC + base + R_PAD * D + rows, bias)
        tl.store(CNT + pid_bh, 0)  # arrival counter of the fused merge (the split kernel runs after this one)
        if NR_PAD > 0:  # v4 affine: the chunk-claim counters of the SM ranges
            if pid_bh == 0:
                ar = tl.arange(0, NR_PAD)
                tl.store(CLAIM + ar, 0, mask=ar < NR)

    # ------------------------------------------------------------------ v4: the coded key-LUT loop, latency hiding
    # Options of DecodePlan (NOTES.md "v4"): PF (prefetch) 1 = the codes and anchor words of block i+1 are loaded
    # at the top of iteration i (carried in loop variables, so their HBM latency overlaps block i); PF 2 = also
    # the value-centroid gathers of block i are issued with its key-LUT gathers, before its softmax. NS = 2
    # streams: two independent token ranges interleaved in one loop (two online-softmax states, merged at the
    # end). LEAN: key codes read as 32/16-bit words, one token per thread, the sub-space sum of the LUT rows
    # in registers (no cross-lane shuffles, no replicated softmax), per-slot running sums l. VB: values as the
    # B operand of p^T @ vc (one shared-memory round trip per block). AFFINE: chunks claimed per SM
    # (_v4_worker). PROBE: timing probe, not exact (_v4_chunk).
    @triton.jit
    def _v4_state(R_G: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  VB: tl.constexpr, LEAN: tl.constexpr):
        """Empty online-softmax state of one stream: running max [R_G], accumulator ([R_PAD, D] with VB, else
        [D, R_G]) and sums ([BLOCK_N, R_G] per lane with LEAN, else [R_G])."""
        m = tl.full([R_G], float("-inf"), tl.float32)
        if VB:
            acc = tl.zeros([R_PAD, D], tl.float32)
        else:
            acc = tl.zeros([D, R_G], tl.float32)
        if LEAN:
            l_ = tl.zeros([BLOCK_N, R_G], tl.float32)
        else:
            l_ = tl.zeros([R_G], tl.float32)
        return m, acc, l_

    @triton.jit
    def _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n0, lim, BLOCK_N: tl.constexpr, KW: tl.constexpr,
                  C_V: tl.constexpr):
        """Key codes [BLOCK_N, KW] (code words when LEAN, else bytes), value codes [BLOCK_N, C_V] and anchor-bit
        words [BLOCK_N] of the tokens n0 .. n0 + BLOCK_N - 1; tokens >= lim read as 0 (no memory access)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < lim
        kw = tl.arange(0, KW)
        kc = tl.load(CK + ck_base + offs_n[:, None] * KW + kw[None, :], mask=nmask[:, None], other=0,
                     cache_modifier=".cg")  # read once: keep them out of L1 (the tables live there)
        cv_idx = tl.arange(0, C_V)
        vc = tl.load(CV + cv_base + offs_n[:, None] * C_V + cv_idx[None, :], mask=nmask[:, None], other=0,
                     cache_modifier=".cg")
        word = tl.load(BITS + bits_base + offs_n // 32, mask=nmask, other=0, cache_modifier=".cg")
        return kc, vc, word

    @triton.jit
    def _v4_kload(LUT, lut_base, kc, rows_g, C_K: tl.constexpr, KW: tl.constexpr, CPW: tl.constexpr,
                  M_K: tl.constexpr, R_G: tl.constexpr, BLOCK_N: tl.constexpr, CACHE: tl.constexpr,
                  LEAN: tl.constexpr):
        """Key-LUT gathers of one block: LEAN returns the logits [BLOCK_N, R_G] (summed per token in registers),
        otherwise the raw rows [BLOCK_N, C_K, R_G] (summed by _v4_ksum). Code c of a token indexes LUT table c
        (= stage * S + sub-space), so multi-stage codebooks need nothing special."""
        if LEAN:
            wi = tl.arange(0, KW)
            kc32 = kc.to(tl.int32)
            out = tl.zeros([BLOCK_N, R_G], tl.float32)
            for c in tl.static_range(C_K):
                word = tl.sum(tl.where(wi[None, :] == c // CPW, kc32, 0), axis=1)  # the word holding code c
                code = (word >> (8 * (c % CPW))) & 255
                out += tl.load(LUT + lut_base + (c * M_K + code[:, None]) * R_G + rows_g[None, :],
                               cache_modifier=CACHE)
        else:
            ck_idx = tl.arange(0, C_K)
            lptr = (LUT + lut_base + (ck_idx[None, :, None] * M_K + kc.to(tl.int32)[:, :, None]) * R_G
                    + rows_g[None, None, :])
            out = tl.load(lptr, cache_modifier=CACHE)
        return out

    @triton.jit
    def _v4_ksum(raw, LEAN: tl.constexpr):
        if LEAN:
            lg = raw
        else:
            lg = tl.sum(raw, axis=1)
        return lg

    @triton.jit
    def _v4_vload(CENT_V, vc, hv, HCB_V, C_V: tl.constexpr, S_V: tl.constexpr, M_V: tl.constexpr,
                  SUB_V: tl.constexpr, CACHE: tl.constexpr, BLOCK_N: tl.constexpr, VB: tl.constexpr):
        """Value-centroid gathers of one block (one per token and code): [BLOCK_N, C_V, SUB_V], or with VB the
        same as one 2-D [BLOCK_N, C_V * SUB_V] load (16-byte runs declared to the compiler), which then feeds the
        product as its B operand through one shared-memory round trip."""
        c_idx = tl.arange(0, C_V)
        e_idx = tl.arange(0, SUB_V)
        tab = ((c_idx // S_V) * HCB_V + hv) * S_V + c_idx % S_V  # (stage, head, sub-space) table of code c
        offs = (tab[None, :, None] * M_V + vc.to(tl.int32)[:, :, None]) * SUB_V + e_idx[None, None, :]
        if VB:
            offs2 = tl.reshape(offs, [BLOCK_N, C_V * SUB_V])
            offs2 = tl.max_contiguous(tl.multiple_of(offs2, [1, SUB_V]), [1, SUB_V])
            x = tl.load(CENT_V + offs2, cache_modifier=CACHE)
        else:
            x = tl.load(CENT_V + offs, cache_modifier=CACHE)
        return x

    @triton.jit
    def _v4_double(x, R: tl.constexpr):
        """Zero-pad the last dimension of x ([R] or [N, R]) to 2 R."""
        j = tl.join(x, tl.zeros_like(x))
        if len(x.shape) == 1:
            x = tl.reshape(tl.trans(j), [2 * R])
        else:
            x = tl.reshape(tl.permute(j, (0, 2, 1)), [x.shape[0], 2 * R])
        return x

    @triton.jit
    def _v4_pad(x, R: tl.constexpr, R_PAD: tl.constexpr):
        """Zero-pad the last dimension of x ([R] or [N, R]) to R_PAD (R_PAD / R in {1, 2, 4})."""
        if R * 2 <= R_PAD:
            x = _v4_double(x, R)
        if R * 4 <= R_PAD:
            x = _v4_double(x, 2 * R)
        return x

    @triton.jit
    def _v4_softmax(lg, bias_g, word, n0, lim, m_t, l_t, BLOCK_N: tl.constexpr, LSLOT: tl.constexpr):
        """Online-softmax step (base 2) of one block: returns (p, alpha, m_new, l_new); LSLOT keeps the running
        sum per token slot [BLOCK_N, R_G] (reduced once after the loop) instead of reducing every block."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = (offs_n < lim) & (((word >> (offs_n % 32)) & 1) == 0)
        lg = tl.where(keep[:, None], lg + bias_g[None, :], float("-inf"))
        m_new = tl.maximum(m_t, tl.max(lg, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_t - m_use)
        p = tl.exp2(lg - m_use[None, :])
        if LSLOT:
            l_new = l_t * alpha[None, :] + p
        else:
            l_new = l_t * alpha + tl.sum(p, axis=0)
        return p, alpha, m_new, l_new

    @triton.jit
    def _v4_accum(acc_t, alpha, p, x, ST_V: tl.constexpr, S_V: tl.constexpr, SUB_V: tl.constexpr,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                  R_G: tl.constexpr, R_PAD: tl.constexpr, VB: tl.constexpr):
        """acc_t [D, R_G] = acc_t * alpha + vc^T p, vc [BLOCK_N, D] = the gathered centroids x summed over stages;
        with VB acc [R_PAD, D] = acc * alpha + p^T vc (rows padded with zeros to the MMA's 16)."""
        if ST_V == 1:
            xs = x.to(DOT)
        else:
            xs = tl.sum(tl.reshape(x.to(tl.float32), [BLOCK_N, ST_V, S_V * SUB_V]), axis=1).to(DOT)
        vc = tl.reshape(xs, [BLOCK_N, D])
        if VB:
            p16 = _v4_pad(p.to(DOT), R_G, R_PAD)  # [BLOCK_N, R_PAD]
            a16 = _v4_pad(alpha, R_G, R_PAD)
            acc = acc_t * a16[:, None] + tl.dot(tl.trans(p16), vc, input_precision=PREC)
        else:
            acc = acc_t * alpha[None, :] + tl.dot(tl.trans(vc), p.to(DOT), input_precision=PREC)
        return acc

    @triton.jit
    def _v4_merge2(m_a, l_a, acc_a, m_b, l_b, acc_b, R_G: tl.constexpr, R_PAD: tl.constexpr, VB: tl.constexpr):
        m = tl.maximum(m_a, m_b)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        fa = tl.exp2(m_a - m_use)
        fb = tl.exp2(m_b - m_use)
        if VB:
            acc = acc_a * _v4_pad(fa, R_G, R_PAD)[:, None] + acc_b * _v4_pad(fb, R_G, R_PAD)[:, None]
        else:
            acc = acc_a * fa[None, :] + acc_b * fb[None, :]
        return m, l_a * fa + l_b * fb, acc

    @triton.jit
    def _coded_v4(CK, CV, BITS, LUT, CENT_V, QC, qc_base, start, end, ck_base, cv_base, bits_base, lut_base, hv,
                  HCB_V, R_PAD: tl.constexpr, D: tl.constexpr, C_K: tl.constexpr, KW: tl.constexpr,
                  CPW: tl.constexpr, M_K: tl.constexpr, C_V: tl.constexpr, S_V: tl.constexpr, M_V: tl.constexpr,
                  SUB_V: tl.constexpr, ST_V: tl.constexpr, R_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr, LEAN: tl.constexpr, PF: tl.constexpr,
                  NS: tl.constexpr, VB: tl.constexpr):
        """The coded tokens start .. end-1 of one split program, key-LUT path; returns (m [R_G], l [R_G], acc), acc
        = acc^T [D, R_G], or with VB acc [R_PAD, D] (rows >= R_G zero)."""
        rows_g = tl.arange(0, R_G)
        bias_g = tl.load(QC + qc_base + R_PAD * D + rows_g)
        n_tok = tl.maximum(end - start, 0)
        if NS == 2:
            span = tl.cdiv(tl.cdiv(n_tok, 2), BLOCK_N) * BLOCK_N  # stream a: [start, start+span), b: the rest
        else:
            span = n_tok
        lim_a = tl.minimum(start + span, end)
        start_b = start + span
        n_blk = tl.cdiv(span, BLOCK_N)
        m_a, acc_a, l_a = _v4_state(R_G, R_PAD, D, BLOCK_N, VB, LEAN)
        if NS == 2:
            m_b, acc_b, l_b = _v4_state(R_G, R_PAD, D, BLOCK_N, VB, LEAN)
        if PF >= 1:
            kc_a, vc_a, w_a = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, start, lim_a, BLOCK_N, KW, C_V)
            if NS == 2:
                kc_b, vc_b, w_b = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, start_b, end, BLOCK_N, KW,
                                            C_V)
        for it in range(0, n_blk):
            n_a = start + it * BLOCK_N
            n_b = start_b + it * BLOCK_N
            # codes: this block's (PF 0) or the next block's (PF >= 1, this block's were loaded one iteration ago)
            if PF >= 1:
                kc_an, vc_an, w_an = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n_a + BLOCK_N, lim_a,
                                               BLOCK_N, KW, C_V)
                if NS == 2:
                    kc_bn, vc_bn, w_bn = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n_b + BLOCK_N, end,
                                                   BLOCK_N, KW, C_V)
            else:
                kc_a, vc_a, w_a = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n_a, lim_a, BLOCK_N, KW, C_V)
                if NS == 2:
                    kc_b, vc_b, w_b = _v4_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n_b, end, BLOCK_N, KW,
                                                C_V)
            # gathers: key-LUT rows (and with PF >= 2 the value centroids) of every stream, before any softmax
            raw_a = _v4_kload(LUT, lut_base, kc_a, rows_g, C_K, KW, CPW, M_K, R_G, BLOCK_N, CACHE, LEAN)
            if PF >= 2:
                x_a = _v4_vload(CENT_V, vc_a, hv, HCB_V, C_V, S_V, M_V, SUB_V, CACHE, BLOCK_N, VB)
            if NS == 2:
                raw_b = _v4_kload(LUT, lut_base, kc_b, rows_g, C_K, KW, CPW, M_K, R_G, BLOCK_N, CACHE, LEAN)
                if PF >= 2:
                    x_b = _v4_vload(CENT_V, vc_b, hv, HCB_V, C_V, S_V, M_V, SUB_V, CACHE, BLOCK_N, VB)
            p_a, al_a, m_a, l_a = _v4_softmax(_v4_ksum(raw_a, LEAN), bias_g, w_a, n_a, lim_a, m_a, l_a, BLOCK_N,
                                              LEAN)
            if NS == 2:
                p_b, al_b, m_b, l_b = _v4_softmax(_v4_ksum(raw_b, LEAN), bias_g, w_b, n_b, end, m_b, l_b, BLOCK_N,
                                                  LEAN)
            if PF < 2:
                x_a = _v4_vload(CENT_V, vc_a, hv, HCB_V, C_V, S_V, M_V, SUB_V, CACHE, BLOCK_N, VB)
                if NS == 2:
                    x_b = _v4_vload(CENT_V, vc_b, hv, HCB_V, C_V, S_V, M_V, SUB_V, CACHE, BLOCK_N, VB)
            acc_a = _v4_accum(acc_a, al_a, p_a, x_a, ST_V, S_V, SUB_V, BLOCK_N, D, DOT, PREC, R_G, R_PAD, VB)
            if NS == 2:
                acc_b = _v4_accum(acc_b, al_b, p_b, x_b, ST_V, S_V, SUB_V, BLOCK_N, D, DOT, PREC, R_G, R_PAD, VB)
            if PF >= 1:
                kc_a, vc_a, w_a = kc_an, vc_an, w_an
                if NS == 2:
                    kc_b, vc_b, w_b = kc_bn, vc_bn, w_bn
        if LEAN:
            l_a = tl.sum(l_a, axis=0)
        if NS == 2:
            if LEAN:
                l_b = tl.sum(l_b, axis=0)
            m_a, l_a, acc_a = _v4_merge2(m_a, l_a, acc_a, m_b, l_b, acc_b, R_G, R_PAD, VB)
        return m_a, l_a, acc_a

    @triton.jit
    def _v4_chunk(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, pair, cidx, HKV, N_CAP, NW, P_CODED, PS, HCB_V,
                  CBV_PER_HEAD, G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
                  C_K: tl.constexpr, KW: tl.constexpr, CPW: tl.constexpr, M_K: tl.constexpr, C_V: tl.constexpr,
                  S_V: tl.constexpr, M_V: tl.constexpr, SUB_V: tl.constexpr, ST_V: tl.constexpr, R_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr,
                  LEAN: tl.constexpr, PF: tl.constexpr, NS: tl.constexpr, VB: tl.constexpr, PROBE: tl.constexpr):
        """Coded chunk cidx (of P_CODED) of one (sequence, KV head) = pair through the v4 loop, stored as partial
        slot cidx. PROBE (timing only, not exact): every pair reads pair 0's key LUT and head 0's value codebook,
        i.e. the gathers of all programs hit one 2 x 64 KB working set."""
        b = pair // HKV
        h = pair % HKV
        n_b = tl.load(NCODED + b)
        chunk = tl.cdiv(tl.cdiv(n_b, P_CODED), BLOCK_N) * BLOCK_N
        start = cidx * chunk
        end = tl.minimum(start + chunk, n_b)
        if PROBE:
            hv = 0
            lut_base = 0
        else:
            hv = h * CBV_PER_HEAD
            lut_base = pair * (C_K * M_K * R_G)
        m, l, acc = _coded_v4(CK, CV, BITS, LUT, CENT_V, QC, pair * R_PAD * (D + 1), start, end, pair * N_CAP * KW,
                              pair * N_CAP * C_V, pair * NW, lut_base, hv, HCB_V, R_PAD, D, C_K, KW, CPW, M_K, C_V,
                              S_V, M_V, SUB_V, ST_V, R_G, BLOCK_N, DOT, PREC, CACHE, LEAN, PF, NS, VB)
        if VB:
            _store_partial(PO, PL, pair, cidx, PS, acc, _v4_pad(m, R_G, R_PAD), _v4_pad(l, R_G, R_PAD), G * TQ,
                           R_PAD, D, R_PAD)
        else:
            _store_partial(PO, PL, pair, cidx, PS, tl.trans(acc), m, l, G * TQ, R_G, D, R_PAD)

    @triton.jit
    def _arrive_merge(PO, PL, CNT, INV_V, MEAN_V, OUT, LSE, pair, HKV, PS, P_CODED, P, CBV_PER_HEAD,
                      s_ob, s_oh, s_ot, s_lb, s_lh, G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr,
                      R_G: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, PB: tl.constexpr, KC: tl.constexpr):
        """Count one partial of `pair` as arrived; the last of its P partials merges them all (fused merge)."""
        tl.debug_barrier()
        done = tl.atomic_add(CNT + pair, 1, sem="acq_rel")
        if done == P - 1:
            _merge_tail(PO, PL, INV_V, MEAN_V, OUT, LSE, pair, pair // HKV, pair % HKV, PS, P_CODED, P, CBV_PER_HEAD,
                        s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ, R_PAD, R_G, D, PREC, PB, KC)

    @triton.jit
    def _v4_worker(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, CNT, CLAIM, INV_V, MEAN_V, OUT, LSE,
                   s_ob, s_oh, s_ot, s_lb, s_lh, HKV, N_CAP, NW, P_CODED, P, PS, HCB_V, CBV_PER_HEAD, NR,
                   G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
                   C_K: tl.constexpr, KW: tl.constexpr, CPW: tl.constexpr, M_K: tl.constexpr, C_V: tl.constexpr,
                   S_V: tl.constexpr, M_V: tl.constexpr, SUB_V: tl.constexpr, ST_V: tl.constexpr, R_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr,
                   LEAN: tl.constexpr, PF: tl.constexpr, NS: tl.constexpr, VB: tl.constexpr, PROBE: tl.constexpr,
                   PB: tl.constexpr, KC: tl.constexpr, NR_PAD: tl.constexpr, INTERP: tl.constexpr,
                   FUSE: tl.constexpr):
        """SM-affine coded worker (v4 "affine"). The C = pairs x P_CODED coded chunks, in (pair, chunk) order, are
        cut into NR contiguous ranges, one per multiprocessor; a worker claims chunks of its own SM's range
        (%smid) with an atomic counter, so the programs resident on one SM work on consecutive chunks, i.e. on
        the same pair and the same key-LUT / value-codebook tables (L1 reuse instead of L2 traffic); when its
        range is empty it takes chunks from the range with most left. Every chunk is claimed exactly once."""
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if INTERP:  # no %smid under the interpreter
            smid = pid % NR
        else:
            smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=True,
                                             pack=1)
        n_chunks = tl.num_programs(0) * P_CODED
        r = smid % NR
        ar = tl.arange(0, NR_PAD)
        size_all = (ar + 1) * n_chunks // NR - ar * n_chunks // NR
        go = pid >= 0
        while go:
            c = tl.atomic_add(CLAIM + r, 1, sem="relaxed")
            lo = r * n_chunks // NR
            chunk = lo + c
            if chunk < (r + 1) * n_chunks // NR:
                pair = chunk // P_CODED
                _v4_chunk(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, pair, chunk % P_CODED, HKV, N_CAP, NW,
                          P_CODED, PS, HCB_V, CBV_PER_HEAD, G, TQ, R_PAD, D, C_K, KW, CPW, M_K, C_V, S_V, M_V, SUB_V,
                          ST_V, R_G, BLOCK_N, DOT, PREC, CACHE, LEAN, PF, NS, VB, PROBE)
                if FUSE:
                    _arrive_merge(PO, PL, CNT, INV_V, MEAN_V, OUT, LSE, pair, HKV, PS, P_CODED, P, CBV_PER_HEAD,
                                  s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ, R_PAD, R_G, D, PREC, PB, KC)
            else:
                taken = tl.load(CLAIM + ar, mask=ar < NR, other=0, volatile=True)  # L2, not a stale L1 line
                left = tl.where(ar < NR, size_all - taken, -1)
                go = tl.max(left, axis=0) > 0
                r = tl.argmax(left, axis=0)

    @triton.jit
    def _decode_partials_kernel(
        Q, QC, CK, CV, BITS, NCODED, AK, AV, APOS, WK, WV, WLEN,
        CENT_K, CENT_V,
        PO, PL, LUT, CNT, INV_V, MEAN_V, OUT, LSE,
        s_qb, s_qh, s_qt, s_ob, s_oh, s_ot, s_lb, s_lh,
        HKV, N_CAP, NW, A_CAP, W_CAP, P_CODED, P_ANCHOR, P, PS,
        HCB_K, CBK_PER_HEAD, HCB_V, CBV_PER_HEAD,
        qk_scale,
        G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
        C_K: tl.constexpr, S_K: tl.constexpr, M_K: tl.constexpr, SUB_K: tl.constexpr, ST_K: tl.constexpr,
        C_V: tl.constexpr, S_V: tl.constexpr, M_V: tl.constexpr, SUB_V: tl.constexpr, ST_V: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_W: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr, ROWS_T: tl.constexpr, R_G: tl.constexpr,
        SUBMAJOR: tl.constexpr, KLUT: tl.constexpr, FUSE: tl.constexpr, PB: tl.constexpr, KC: tl.constexpr,
        V4: tl.constexpr = False, LEAN: tl.constexpr = False, PF: tl.constexpr = 0, NS: tl.constexpr = 1,
        KW: tl.constexpr = 1, CPW: tl.constexpr = 1, VB: tl.constexpr = False, PROBE: tl.constexpr = False,
        AFFINE: tl.constexpr = False, CLAIM=None, NR=1, NR_PAD: tl.constexpr = 1, INTERP: tl.constexpr = False,
        PID0=0,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1) + PID0  # PID0 = P_CODED: the coded partials came from the CUDA kernel
        b = pid_bh // HKV
        h = pid_bh % HKV
        offs_d = tl.arange(0, D)
        rows = tl.arange(0, R_PAD)
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32)
        if pid_s < P_CODED:
            if V4:
                # ---------------------------------------------------------------- coded tokens, v4 loop (key LUT)
                if AFFINE:
                    _v4_worker(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, CNT, CLAIM, INV_V, MEAN_V, OUT, LSE,
                               s_ob, s_oh, s_ot, s_lb, s_lh, HKV, N_CAP, NW, P_CODED, P, PS, HCB_V, CBV_PER_HEAD, NR,
                               G, TQ, R_PAD, D, ST_K * S_K, KW, CPW, M_K, C_V, S_V, M_V, SUB_V, ST_V, R_G, BLOCK_N, DOT,
                               PREC, CACHE, LEAN, PF, NS, VB, PROBE, PB, KC, NR_PAD, INTERP, FUSE)
                else:
                    _v4_chunk(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, pid_bh, pid_s, HKV, N_CAP, NW, P_CODED,
                              PS, HCB_V, CBV_PER_HEAD, G, TQ, R_PAD, D, ST_K * S_K, KW, CPW, M_K, C_V, S_V, M_V, SUB_V,
                              ST_V, R_G, BLOCK_N, DOT, PREC, CACHE, LEAN, PF, NS, VB, PROBE)
            else:
                # ---------------------------------------------------------------- coded tokens
                n_b = tl.load(NCODED + b)
                chunk = tl.cdiv(tl.cdiv(n_b, P_CODED), BLOCK_N) * BLOCK_N
                start = pid_s * chunk
                end = tl.minimum(start + chunk, n_b)
                hk = h * CBK_PER_HEAD
                hv = h * CBV_PER_HEAD
                qc_base = pid_bh * R_PAD * (D + 1)
                ck_base = pid_bh * N_CAP * C_K
                cv_base = pid_bh * N_CAP * C_V
                bits_base = pid_bh * NW
                if ROWS_T or KLUT:
                    # tokens on the MMA's M side, the R_G query rows on its N side (padded to 8, not 16)
                    rows_g = tl.arange(0, R_G)
                    if not KLUT:
                        qc_t = tl.load(QC + qc_base + rows_g[None, :] * D + offs_d[:, None]).to(DOT)  # [D, R_G]
                    bias_g = tl.load(QC + qc_base + R_PAD * D + rows_g)
                    lut_base = pid_bh * (ST_K * S_K * M_K * R_G)
                    sk_idx = tl.arange(0, S_K)
                    m_t = tl.full([R_G], float("-inf"), tl.float32)
                    l_t = tl.zeros([R_G], tl.float32)
                    acc_t = tl.zeros([D, R_G], tl.float32)
                    for n0 in range(start, end, BLOCK_N):
                        offs_n = n0 + tl.arange(0, BLOCK_N)
                        nmask = offs_n < end
                        if KLUT:
                            # logits = sum over sub-spaces of one 16-byte LUT row [R_G] per (token, sub-space)
                            lg = tl.zeros([BLOCK_N, R_G], tl.float32)
                            for st in tl.static_range(ST_K):
                                code = tl.load(CK + ck_base + offs_n[:, None] * C_K + st * S_K + sk_idx[None, :],
                                               mask=nmask[:, None], other=0).to(tl.int32)  # [BLOCK_N, S]
                                lptr = (LUT + lut_base
                                        + ((st * S_K + sk_idx[None, :, None]) * M_K + code[:, :, None]) * R_G
                                        + rows_g[None, None, :])
                                lg += tl.sum(tl.load(lptr, cache_modifier=CACHE), axis=1)
                            lg = lg + bias_g[None, :]
                        else:
                            kc = _dequant(CK, ck_base, offs_n, nmask, C_K, CENT_K, hk, HCB_K, S_K, M_K, SUB_K, ST_K,
                                          BLOCK_N, D, DOT, CACHE, SUBMAJOR)
                            lg = tl.dot(kc, qc_t, input_precision=PREC) + bias_g[None, :]  # [BLOCK_N, R_G]
                        word = tl.load(BITS + bits_base + offs_n // 32, mask=nmask, other=0)
                        keep = nmask & (((word >> (offs_n % 32)) & 1) == 0)
                        lg = tl.where(keep[:, None], lg, float("-inf"))
                        m_new = tl.maximum(m_t, tl.max(lg, axis=0))
                        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.exp2(m_t - m_use)
                        p = tl.exp2(lg - m_use[None, :])
                        l_t = l_t * alpha + tl.sum(p, axis=0)
                        vc = _dequant(CV, cv_base, offs_n, nmask, C_V, CENT_V, hv, HCB_V, S_V, M_V, SUB_V, ST_V,
                                      BLOCK_N, D, DOT, CACHE, SUBMAJOR)
                        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(vc), p.to(DOT), input_precision=PREC)
                        m_t = m_new
                    _store_partial(PO, PL, pid_bh, pid_s, PS, tl.trans(acc_t), m_t, l_t, G * TQ, R_G, D, R_PAD)
                else:
                    qc = tl.load(QC + qc_base + rows[:, None] * D + offs_d[None, :]).to(DOT)
                    bias = tl.load(QC + qc_base + R_PAD * D + rows)
                    for n0 in range(start, end, BLOCK_N):
                        offs_n = n0 + tl.arange(0, BLOCK_N)
                        nmask = offs_n < end
                        kc = _dequant(CK, ck_base, offs_n, nmask, C_K, CENT_K, hk, HCB_K, S_K, M_K, SUB_K, ST_K,
                                      BLOCK_N, D, DOT, CACHE, SUBMAJOR)
                        logits = tl.dot(qc, tl.trans(kc), input_precision=PREC) + bias[:, None]
                        word = tl.load(BITS + bits_base + offs_n // 32, mask=nmask, other=0)
                        keep = nmask & (((word >> (offs_n % 32)) & 1) == 0)
                        logits = tl.where(keep[None, :], logits, float("-inf"))
                        p, alpha, m_i, l_i = _online_update(logits, m_i, l_i, acc)
                        vc = _dequant(CV, cv_base, offs_n, nmask, C_V, CENT_V, hv, HCB_V, S_V, M_V, SUB_V, ST_V,
                                      BLOCK_N, D, DOT, CACHE, SUBMAJOR)
                        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vc, input_precision=PREC)
                    _store_partial(PO, PL, pid_bh, pid_s, PS, acc, m_i, l_i, G * TQ, R_PAD, D, R_PAD)
        else:
            # ---------------------------------------------------------------- exact: anchors (+ window)
            q = _load_rows(Q, b, h, s_qb, s_qh, s_qt, G, TQ, R_PAD, D)
            qs = (q * qk_scale).to(DOT)
            per = tl.cdiv(tl.cdiv(A_CAP, P_ANCHOR), BLOCK_A) * BLOCK_A
            start = (pid_s - P_CODED) * per
            end = tl.minimum(start + per, A_CAP)
            a_base = pid_bh * A_CAP
            for a0 in range(start, end, BLOCK_A):
                offs_a = a0 + tl.arange(0, BLOCK_A)
                amask = offs_a < end
                pos = tl.load(APOS + a_base + offs_a, mask=amask, other=-1)
                valid = amask & (pos >= 0)
                kt = tl.load(AK + (a_base + offs_a[:, None]) * D + offs_d[None, :], mask=amask[:, None], other=0.0)
                logits = tl.dot(qs, tl.trans(kt.to(DOT)), input_precision=PREC)
                logits = tl.where(valid[None, :], logits, float("-inf"))
                p, alpha, m_i, l_i = _online_update(logits, m_i, l_i, acc)
                vt = tl.load(AV + (a_base + offs_a[:, None]) * D + offs_d[None, :], mask=amask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vt.to(DOT), input_precision=PREC)
            if pid_s == P_CODED:
                # the window (causal), in the first exact program
                wl = tl.load(WLEN + b)
                last = wl - TQ + rows % TQ  # last visible window index per row
                w_base = pid_bh * W_CAP
                for w0 in range(0, wl, BLOCK_W):
                    offs_w = w0 + tl.arange(0, BLOCK_W)
                    wmask = offs_w < wl
                    kt = tl.load(WK + (w_base + offs_w[:, None]) * D + offs_d[None, :], mask=wmask[:, None],
                                 other=0.0)
                    logits = tl.dot(qs, tl.trans(kt.to(DOT)), input_precision=PREC)
                    vis = wmask[None, :] & (offs_w[None, :] <= last[:, None])
                    logits = tl.where(vis, logits, float("-inf"))
                    p, alpha, m_i, l_i = _online_update(logits, m_i, l_i, acc)
                    vt = tl.load(WV + (w_base + offs_w[:, None]) * D + offs_d[None, :], mask=wmask[:, None],
                                 other=0.0)
                    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vt.to(DOT), input_precision=PREC)
            _store_partial(PO, PL, pid_bh, pid_s, PS, acc, m_i, l_i, G * TQ, R_PAD, D, R_PAD)
        if FUSE:
            # the last program of this (sequence, KV head) to finish merges all its partials (no merge launch)
            if AFFINE:
                if pid_s >= P_CODED:  # the affine coded workers arrived per chunk
                    _arrive_merge(PO, PL, CNT, INV_V, MEAN_V, OUT, LSE, pid_bh, HKV, PS, P_CODED, P, CBV_PER_HEAD,
                                  s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ, R_PAD, R_G, D, PREC, PB, KC)
            else:
                tl.debug_barrier()
                done = tl.atomic_add(CNT + pid_bh, 1, sem="acq_rel")
                if done == P - 1:
                    _merge_tail(PO, PL, INV_V, MEAN_V, OUT, LSE, pid_bh, b, h, PS, P_CODED, P, CBV_PER_HEAD,
                                s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ, R_PAD, R_G, D, PREC, PB, KC)

    @triton.jit
    def _store_output(OUT, LSE, m_i, l_i, acc, rows, offs_d, b, h, s_ob, s_oh, s_ot, s_lb, s_lh,
                      G: tl.constexpr, TQ: tl.constexpr):
        """Normalize the merged (m, l, acc) of each query row; write out [.., D] and the natural-log LSE."""
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        rg = rows // TQ
        rt = rows % TQ
        rvalid = rows < G * TQ
        hq = h * G + rg
        tl.store(OUT + b * s_ob + hq[:, None] * s_oh + rt[:, None] * s_ot + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=rvalid[:, None])
        tl.store(LSE + b * s_lb + hq * s_lh + rt, lse, mask=rvalid)

    @triton.jit
    def _merge_tail(PO, PL, INV_V, MEAN_V, OUT, LSE, pid_bh, b, h, PS, P_CODED, P, CBV_PER_HEAD,
                    s_ob, s_oh, s_ot, s_lb, s_lh, G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr,
                    RM: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, PB: tl.constexpr, KC: tl.constexpr):
        """Merge of one head's P partials by its last-arriving split program. Rows are RM (the real G*Tq
        rows padded to a power of two, not to 16); the value inverse transform runs as a [16, D] x [D, D]
        product in KC-row slices of the inverse (bounded registers), through two scratch slots (P, P + 1)."""
        rows = tl.arange(0, RM)
        offs_d = tl.arange(0, D)
        m_c = tl.full([RM], float("-inf"), tl.float32)
        l_c = tl.zeros([RM], tl.float32)
        acc_c = tl.zeros([RM, D], tl.float32)
        m_c, l_c, acc_c = _merge_range(PO, PL, pid_bh, PS, 0, P_CODED, m_c, l_c, acc_c, G * TQ, RM, D, PB, R_PAD)
        has_c = l_c > 0.0
        oc = acc_c / tl.where(has_c, l_c, 1.0)[:, None]
        sc0 = (pid_bh * PS + P) * R_PAD
        sc1 = (pid_bh * PS + P + 1) * R_PAD
        tl.store(PO + (sc0 + rows[:, None]) * D + offs_d[None, :], oc)
        tl.debug_barrier()
        r16 = tl.arange(0, R_PAD)
        rm16 = r16 < RM
        offs_k = tl.arange(0, KC)
        hv = h * CBV_PER_HEAD
        y = tl.zeros([R_PAD, D], tl.float32)
        for k0 in tl.static_range(0, D, KC):
            a = tl.load(PO + (sc0 + r16[:, None]) * D + k0 + offs_k[None, :], mask=rm16[:, None], other=0.0,
                        cache_modifier=".cg")
            w = tl.load(INV_V + hv * D * D + (k0 + offs_k)[:, None] * D + offs_d[None, :])
            y += tl.dot(a, w, input_precision=PREC)
        y = y + tl.load(MEAN_V + hv * D + offs_d)[None, :]
        tl.store(PO + (sc1 + r16[:, None]) * D + offs_d[None, :], y, mask=rm16[:, None])
        tl.debug_barrier()
        out_c = tl.load(PO + (sc1 + rows[:, None]) * D + offs_d[None, :], cache_modifier=".cg")
        m_i = tl.where(has_c, m_c + tl.log2(tl.where(has_c, l_c, 1.0)), float("-inf"))
        l_i = tl.where(has_c, 1.0, 0.0)
        acc = tl.where(has_c[:, None], out_c, 0.0)
        m_i, l_i, acc = _merge_range(PO, PL, pid_bh, PS, P_CODED, P, m_i, l_i, acc, G * TQ, RM, D, PB, R_PAD)
        _store_output(OUT, LSE, m_i, l_i, acc, rows, offs_d, b, h, s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ)

    @triton.jit
    def _merge_range(PO, PL, pid_bh, P, lo, hi, m_i, l_i, acc, RV: tl.constexpr, R_PAD: tl.constexpr,
                     D: tl.constexpr, PB: tl.constexpr, R_STRIDE: tl.constexpr):
        """Log-sum-exp merge of partials lo..hi-1 into (m_i, l_i, acc), PB partials per vector load; P is
        the slot count per head, R_PAD the rows held (<= R_STRIDE, the rows stored per slot)."""
        rows = tl.arange(0, R_PAD)
        offs_d = tl.arange(0, D)
        offs_p = tl.arange(0, PB)
        rmask = rows < RV
        for p0 in range(lo, hi, PB):
            pp = p0 + offs_p
            pmask = pp < hi
            base = (pid_bh * P + pp) * R_STRIDE  # [PB]
            mask2 = pmask[:, None] & rmask[None, :]
            lse2 = tl.load(PL + base[:, None] + rows[None, :], mask=mask2, other=float("-inf"),
                           cache_modifier=".cg")  # [PB, R_PAD]
            o = tl.load(PO + (base[:, None, None] + rows[None, :, None]) * D + offs_d[None, None, :],
                        mask=mask2[:, :, None], other=0.0, cache_modifier=".cg")  # [PB, R_PAD, D]
            m_new = tl.maximum(m_i, tl.max(lse2, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            w = tl.exp2(lse2 - m_use[None, :])
            l_i = l_i * alpha + tl.sum(w, axis=0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, axis=0)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _decode_merge_kernel(
        PO, PL, INV_V, MEAN_V, OUT, LSE,
        s_ob, s_oh, s_ot, s_lb, s_lh,
        HKV, P_CODED, P, PS, CBV_PER_HEAD,
        G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
        PB: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        b = pid_bh // HKV
        h = pid_bh % HKV
        rows = tl.arange(0, R_PAD)
        offs_d = tl.arange(0, D)
        # coded partials (coding space of the values)
        m_c = tl.full([R_PAD], float("-inf"), tl.float32)
        l_c = tl.zeros([R_PAD], tl.float32)
        acc_c = tl.zeros([R_PAD, D], tl.float32)
        m_c, l_c, acc_c = _merge_range(PO, PL, pid_bh, PS, 0, P_CODED, m_c, l_c, acc_c, G * TQ, R_PAD, D, PB, R_PAD)
        has_c = l_c > 0.0
        out_c = acc_c / tl.where(has_c, l_c, 1.0)[:, None]
        hv = h * CBV_PER_HEAD
        inv = tl.load(INV_V + hv * D * D + offs_d[:, None] * D + offs_d[None, :])  # [d, e]
        mean = tl.load(MEAN_V + hv * D + offs_d)
        out_c = tl.dot(out_c, inv, input_precision=PREC) + mean[None, :]
        # running merge, starting from the coded partial
        m_i = tl.where(has_c, m_c + tl.log2(tl.where(has_c, l_c, 1.0)), float("-inf"))
        l_i = tl.where(has_c, 1.0, 0.0)
        acc = tl.where(has_c[:, None], out_c, 0.0)
        m_i, l_i, acc = _merge_range(PO, PL, pid_bh, PS, P_CODED, P, m_i, l_i, acc, G * TQ, R_PAD, D, PB, R_PAD)
        _store_output(OUT, LSE, m_i, l_i, acc, rows, offs_d, b, h, s_ob, s_oh, s_ot, s_lb, s_lh, G, TQ)


LAST_LAUNCH: dict = {}  # the last compiled kernel per launcher (the benchmark reads registers / spills)
# The coded split programs: "auto" = the CUDA C++ kernel (coded_decode.cu) where it supports the call, else the
# Triton loop; ANTKV_DECODE_CODED=triton|cuda|auto overrides the default of every call that does not pass one.
DEFAULT_CODED = os.environ.get("ANTKV_DECODE_CODED", "auto")
# The pre-RoPE coded kernel's rotation (rope_decode.py): "libdevice" (cos / sin per token and pair), "tile" (the angle
# factored per tile, same fp32 angle), "fast"; ANTKV_ROPE_TRIG overrides the default of calls that pass none.
DEFAULT_ROPE_TRIG = os.environ.get("ANTKV_ROPE_TRIG", "libdevice")
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def default_splits(batch: int, kv_heads: int, capacity: int, anchors: int, sms: int, block_n: int = 64,
                   mult: float = 1.0) -> tuple[int, int]:
    """(coded splits, exact splits) per (sequence, KV head).

    Measured on the H100 (NOTES.md): the split kernel is latency-bound per program, so more resident
    programs help up to about 4 per multiprocessor (B = 32: 3 splits 6.5 ms, 1 split 7.5 ms at 128K),
    while every split costs the merge a partial (B = 1: 32 splits beat 65 by 10-20 %). Hence
    clamp(4 * SMs / (B * Hkv), 3, 32); ``mult`` scales it (the benchmark sweeps it). One exact program
    (anchors + window) per KV head unless the anchors are a large share of the tokens.
    """
    pairs = max(1, batch * kv_heads)
    p_coded = max(1, int(min(32, max(3, cdiv(8 * sms, pairs))) * mult))  # v3: 8/SM (B=8: 18 splits beat 9)
    p_coded = max(1, min(p_coded, cdiv(capacity, 4 * block_n)))
    p_exact = max(1, cdiv(anchors * p_coded, max(1, capacity))) if anchors else 1
    return p_coded, p_exact


def exact_programs(pairs: int, capacity: int, anchors: int, coded_splits: int, sms: int) -> int:
    """Exact programs (anchors + window, then the merge) per (sequence, KV head) beside the CUDA coded kernel.

    At least the anchors' share of the coded splits; at small batches more, up to ~2 programs per multiprocessor
    in all and 8 per pair, and not fewer than 64 anchors each: one program per pair left the anchors of 128K
    tokens (1,311 per head) to 8 programs at B = 1, 0.041 of a 0.120 ms decode. Measured (NOTES.md "v9",
    kernels_bench_decode_20261122-163927): 128K B=1 8 programs 0.090 ms, B=8 4 programs 0.352 ms (from 0.371),
    B=32 and 32K B=128 unchanged with 1."""
    share = max(1, cdiv(anchors * coded_splits, max(1, capacity))) if anchors else 1
    fill = min(8, max(1, 2 * sms // max(1, pairs)), max(1, cdiv(anchors, 64)))
    return max(share, fill)


class DecodePlan:
    """The three launches of one decode call, with their buffers (the benchmark times them one by one)."""

    def __init__(self, q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k, win_v,
                 win_len, cent_k, inv_k, mean_k, cent_v, inv_v, mean_v, scale, *, splits=None, block_n=64,
                 num_warps=4, num_stages=None, out=None, poison=False, gather_cache=".ca", rows_on_n=False,
                 submajor=False, split_mult=1.0, prologue="triton", merge="fused", key_lut=None, merge_pb=8,
                 prefetch=0, streams=1, lean=None, values_b=False, affine=False, probe_tables=False, maxnreg=None,
                 coded=None, cuda_db=None, cuda_mma=None, cuda_kernel=None, cuda_copies=None, cuda_key_half=None,
                 block_a=None, exact_splits=None, value_sel=None, cuda_value_sel=None, workspace=None,
                 rope_keys=None, rope_block_n=None, rope_warps=None, rope_stages=None, rope_split=True,
                 rope_trig=None, rope_impl=None):
        require_triton()
        # rope_keys = (pairs_k, freq_k, attention_scaling): pre-RoPE keys in RoPE-pair sub-spaces (rope_decode.py);
        # cent_k is then the key table with the mean folded in, inv_k / mean_k are unused (None)
        rope = rope_keys is not None
        coded = DEFAULT_CODED if coded is None else coded
        if rope:
            coded = "triton"  # the coded programs are rope_decode's kernel
        b, hq, tq, d = q.shape
        hkv, n_cap = codes_k.shape[1], codes_k.shape[2]
        g = hq // hkv
        r_pad = max(16, next_pow2(g * tq))
        if r_pad > 128:
            raise ValueError(f"decode attention packs G*Tq = {g * tq} query rows per KV head; at most 128")
        a_cap, w_cap = anchor_k.shape[2], win_k.shape[2]
        st_k, hcb_k, s_k, m_k, sub_k = cent_k.shape
        st_v, hcb_v, s_v, m_v, sub_v = cent_v.shape
        # v5 (NOTES.md): the coded split programs as a CUDA C++ kernel with both tables in shared memory
        if coded not in ("triton", "cuda", "auto"):
            raise ValueError(f"coded must be 'triton', 'cuda' or 'auto' (got {coded!r})")
        self.cuda_coded = None
        if coded != "triton" and not interpreting():
            from .coded_decode_cuda import coded_decode_kernel, cuda_splits, unsupported_reason

            reason = unsupported_reason(q, codes_k, codes_v, cent_k, cent_v, r_pad)
            if reason is None:
                try:
                    self.cuda_coded = coded_decode_kernel(q.device, codes_k.shape[3], m_k, codes_v.shape[3], m_v,
                                                          sub_v, cent_v.dtype, cuda_db, cuda_mma, cuda_kernel,
                                                          cuda_copies, (s_k, sub_k, cent_k.dtype), cuda_key_half,
                                                          cuda_value_sel)
                except Exception as exc:  # noqa: BLE001 - NVRTC / driver missing: "auto" falls back to Triton
                    if coded == "cuda":
                        raise
                    reason = f"the CUDA kernel could not be built ({type(exc).__name__}: {exc})"
                    _warn_once(reason + "; the Triton coded loop runs instead")
            if self.cuda_coded is not None:
                key_lut = True
                if splits is None:
                    pc = cuda_splits(b * hkv, n_cap, sm_count(q), self.cuda_coded.ctas_per_sm,
                                     self.cuda_coded.waves * split_mult)
                    splits = (pc, exact_programs(b * hkv, n_cap, a_cap, pc, sm_count(q)))
            elif coded == "cuda":
                raise ValueError(f"coded='cuda' cannot run this call: {reason}; use coded='triton' or 'auto'")
            if self.cuda_coded is not None and affine:
                raise ValueError("affine is an option of the Triton coded loop, not of coded='cuda'")
        elif coded == "cuda":
            raise ValueError("coded='cuda' needs a GPU (not the Triton interpreter); use coded='triton' or 'auto'")
        if rope:
            from .rope_decode import rope_unsupported_reason

            reason = rope_unsupported_reason(q, cent_k, codes_k)
            if reason:
                raise ValueError(f"the pre-RoPE decode kernel cannot run this call: {reason}")
            rope_block_n = 64 if rope_block_n is None else int(rope_block_n)
            if splits is None:  # coded splits as the Triton loop's; exact programs as beside the CUDA kernel
                pc, _ = default_splits(b, hkv, n_cap, a_cap, sm_count(q), rope_block_n, mult=split_mult)
                splits = (pc, exact_programs(b * hkv, n_cap, a_cap, pc, sm_count(q)))
            key_lut, lean = False, False
        if splits is None:
            splits = default_splits(b, hkv, n_cap, a_cap, sm_count(q), block_n, mult=split_mult)
        # with coded="cuda" the Triton launch runs only the exact programs (anchors, window): measured best with
        # 64 anchors per step, pipelined (NOTES.md "v7": 0.111 -> 0.077 ms at 128K B=32); the Triton coded loop
        # keeps its own measured best (32, unpipelined)
        exact_only = self.cuda_coded is not None or rope
        block_a = (64 if exact_only else 32) if block_a is None else int(block_a)
        num_stages = (2 if exact_only else 1) if num_stages is None else int(num_stages)
        p_coded, p_exact = splits
        p_exact = max(1, p_exact if exact_splits is None else int(exact_splits))
        p_total = p_coded + p_exact
        dev = q.device
        self.splits = (p_coded, p_exact)
        fuse = merge == "fused"
        rv = g * tq
        if key_lut is None:
            key_lut = rv <= 8
        if lean is None:  # v4 measurement (NOTES.md): the lean loop is the fastest exact variant, 1.20x / 1.55x v3
            lean = bool(key_lut)
        r_g = max(4, next_pow2(rv)) if (key_lut or fuse) else max(1, next_pow2(rv))
        if rows_on_n and not (key_lut or fuse):
            r_g = max(1, next_pow2(rv))
        p_slots = p_total + 2 if fuse else p_total  # two scratch slots for the fused merge
        # v4 coded loop (NOTES.md): prefetch 0/1/2, streams 1/2, lean, values_b, affine; key-LUT path only.
        # probe_tables is a timing probe, not exact (all heads read one key LUT and one value codebook).
        v4 = bool(prefetch or streams != 1 or lean or values_b or affine or probe_tables)
        if prefetch not in (0, 1, 2) or streams not in (1, 2):
            raise ValueError(f"prefetch must be 0, 1 or 2 and streams 1 or 2 (got {prefetch}, {streams})")
        if v4 and not key_lut:
            raise ValueError("prefetch / streams / lean are options of the key-LUT loop (key_lut, G*Tq <= 8)")
        c_k = codes_k.shape[3]
        cpw = (4 if c_k % 4 == 0 else 2 if c_k % 2 == 0 else 1) if lean else 1  # key codes per loaded word
        ck_plain = ck_arg = codes_k.contiguous()
        if cpw > 1:
            ck_arg = ck_arg.view(torch.int32 if cpw == 4 else torch.int16)
        extra = {} if maxnreg is None else {"maxnreg": int(maxnreg)}
        nr = sm_count(q) if affine else 1  # affine: one chunk range per multiprocessor
        nr_pad = next_pow2(nr)

        def scratch(name, shape, dtype):
            """A scratch buffer, from ``workspace`` (a dict shared by plans that run one after another on one
            stream, e.g. the layers of a model) when given."""
            if workspace is None:
                return torch.empty(shape, dtype=dtype, device=dev)
            t = workspace.get(name)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != dev:
                t = workspace[name] = torch.empty(shape, dtype=dtype, device=dev)
            return t

        self.claim = scratch("claim", (nr_pad,), torch.int32)  # zeroed by the prologue (affine)
        self.po = scratch("po", (b * hkv, p_slots, r_pad, d), torch.float32)
        self.pl = scratch("pl", (b * hkv, p_slots, r_pad), torch.float32)
        self.cnt = scratch("cnt", (max(1, b * hkv),), torch.int32)
        lut_kernel = key_lut and not (self.cuda_coded is not None and self.cuda_coded.builds_lut)
        self.lut = scratch("lut", (b * hkv * st_k * s_k * m_k * r_g,), torch.float32) if lut_kernel else self.cnt
        if poison:
            self.po.fill_(float("nan"))
            self.pl.fill_(float("nan"))
        if out is None:
            out = (torch.empty(b, hq, tq, d, dtype=q.dtype, device=dev),
                   torch.empty(b, hq, tq, dtype=torch.float32, device=dev))
        self.out, self.lse = out
        # every entry is written by the Triton prologue; the torch one (a benchmark comparison) writes G*Tq rows
        if rope:
            self.qc = self.po  # no query transform: the coded kernel reads q itself (any fp32 tensor fills the slot)
        elif prologue == "torch":
            self.qc = torch.zeros(b * hkv, r_pad * (d + 1), dtype=torch.float32, device=dev)
        else:
            self.qc = scratch("qc", (b * hkv, r_pad * (d + 1)), torch.float32)
        q = q.contiguous()
        dt, prec = dot_dtype(q.dtype), dot_precision(q.dtype)
        cbk_ph, cbv_ph = int(hcb_k == hkv and hkv > 1), int(hcb_v == hkv and hkv > 1)
        inv_k32, mean_k32 = (None, None) if rope else (inv_k.float().contiguous(), mean_k.float().contiguous())
        inv_v32, mean_v32 = inv_v.float().contiguous(), mean_v.float().contiguous()
        qk_scale = float(scale) * LOG2E
        self.empty = b * hkv == 0 or tq == 0
        qc = self.qc

        def _prologue():
            if rope:  # the exact programs' arrival counter starts past the coded partials (written before them)
                self.cnt.fill_(p_coded)
                return
            if prologue == "torch":  # cuBLAS instead of the Triton prologue (benchmark comparison)
                qr = q.float().reshape(b, hkv, g * tq, d)
                inv = inv_k32 if hcb_k == hkv else inv_k32.expand(hkv, d, d)
                mean = mean_k32 if hcb_k == hkv else mean_k32.expand(hkv, d)
                view = qc.view(b, hkv, r_pad * (d + 1))
                view[:, :, :g * tq * d] = (torch.einsum("bhrd,hed->bhre", qr, inv) * qk_scale).reshape(b, hkv, -1)
                view[:, :, r_pad * d:r_pad * d + g * tq] = torch.einsum("bhrd,hd->bhr", qr, mean) * qk_scale
                self.cnt.zero_()
                if affine:
                    self.claim.zero_()
            else:
                _decode_prologue_kernel[(b * hkv,)](
                    q, inv_k32, mean_k32, qc, self.cnt, q.stride(0), q.stride(1), q.stride(2), hkv, cbk_ph, qk_scale,
                    G=g, TQ=tq, R_PAD=r_pad, D=d, PREC=prec, num_warps=4,
                    **({"CLAIM": self.claim, "NR": nr, "NR_PAD": nr_pad} if affine else {}),
                )
            if lut_kernel:
                _decode_lut_kernel[(b * hkv, st_k * s_k)](
                    qc, centk_arg, self.lut, hkv, hcb_k, cbk_ph,
                    R_PAD=r_pad, D=d, S=s_k, M=m_k, SUB=sub_k, ST=st_k, R_L=r_g, num_warps=4,
                )

        cuda_coded = self.cuda_coded
        cv_arg, bits_arg, nc_arg, centv_arg = (codes_v.contiguous(), anchor_bits.contiguous(), n_coded.contiguous(),
                                               cent_v.contiguous())
        centk_arg = cent_k.contiguous()
        if cuda_coded is not None and (nc_arg.dtype != torch.int32 or bits_arg.dtype != torch.int32):
            raise ValueError("n_coded and anchor_bits must be int32")
        sel_arg = None  # the CUDA kernel's value-copy selection (a speed hint: any words give the same result)
        if value_sel is not None and cuda_coded is not None and cuda_coded.value_sel:
            if value_sel.shape != codes_v.shape[:3] or value_sel.dtype != torch.int16 or value_sel.device != q.device:
                raise ValueError(f"value_sel must be int16 {tuple(codes_v.shape[:3])} on {q.device} (one word per "
                                 f"coded token, value_copies.value_copy_select); got {value_sel.dtype} "
                                 f"{tuple(value_sel.shape)} on {value_sel.device}")
            sel_arg = value_sel.contiguous()

        def _cuda_partials():
            cuda_coded(b * hkv, p_coded, centk_arg if cuda_coded.builds_lut else self.lut, qc, ck_plain, cv_arg,
                       bits_arg, nc_arg, centv_arg, self.po, self.pl, self.cnt, hkv, n_cap, anchor_bits.shape[2],
                       p_slots, cbv_ph, g * tq, hcb_k, cbk_ph, sel_arg)

        if rope:
            from .rope_decode import launch_rope_coded

            pairs_arg, freq_arg = rope_keys[0].contiguous(), rope_keys[1].float().contiguous()
            rope_cfg = dict(dot=dt, prec=prec, block_n=rope_block_n, num_warps=int(rope_warps or 4),
                            num_stages=int(rope_stages or 1), split=bool(rope_split),
                            trig=DEFAULT_ROPE_TRIG if rope_trig is None else rope_trig,
                            cache=gather_cache, interpret=interpreting(), impl=rope_impl)

        def _rope_partials():
            LAST_LAUNCH["rope_coded"] = launch_rope_coded(
                q, ck_plain, cv_arg, bits_arg, nc_arg, centk_arg, pairs_arg, freq_arg, centv_arg, self.po, self.pl,
                p_coded, p_slots, r_pad, qk_scale, rope_keys[2], **rope_cfg)

        def _triton_partials():
            LAST_LAUNCH["decode"] = _decode_partials_kernel[(b * hkv, p_exact if exact_only else p_total)](
                q, qc, ck_arg, cv_arg, bits_arg, nc_arg,
                anchor_k.contiguous(), anchor_v.contiguous(), anchor_pos.contiguous(),
                win_k.contiguous(), win_v.contiguous(), win_len.contiguous(),
                centk_arg, centv_arg,
                self.po, self.pl, self.lut, self.cnt, inv_v32, mean_v32, self.out, self.lse,
                q.stride(0), q.stride(1), q.stride(2), self.out.stride(0), self.out.stride(1), self.out.stride(2),
                self.lse.stride(0), self.lse.stride(1),
                hkv, n_cap, anchor_bits.shape[2], a_cap, w_cap, p_coded, p_exact, p_total, p_slots,
                hcb_k, cbk_ph, hcb_v, cbv_ph,
                qk_scale,
                G=g, TQ=tq, R_PAD=r_pad, D=d,
                C_K=codes_k.shape[3], S_K=s_k, M_K=m_k, SUB_K=sub_k, ST_K=st_k,
                C_V=codes_v.shape[3], S_V=s_v, M_V=m_v, SUB_V=sub_v, ST_V=st_v,
                BLOCK_N=block_n, BLOCK_A=block_a, BLOCK_W=16, DOT=dt, PREC=prec, CACHE=gather_cache,
                ROWS_T=rows_on_n, R_G=r_g, SUBMAJOR=submajor, KLUT=key_lut, FUSE=fuse, PB=merge_pb,
                KC=min(32, d), V4=v4, LEAN=bool(lean), PF=int(prefetch), NS=int(streams), KW=c_k // cpw, CPW=cpw,
                VB=bool(values_b), PROBE=bool(probe_tables), AFFINE=bool(affine), CLAIM=self.claim, NR=nr,
                NR_PAD=nr_pad, INTERP=interpreting(), PID0=p_coded if exact_only else 0,
                num_warps=num_warps, num_stages=num_stages, **extra,
            )

        def _partials():
            if cuda_coded is not None:
                _cuda_partials()
            if rope:
                _rope_partials()
            _triton_partials()

        # with coded="cuda" the two launches of partials(), timed apart by the benchmark (each after the prologue,
        # which resets the arrival counters: alone, neither reaches the merge)
        self.cuda_partials = _cuda_partials if cuda_coded is not None else None
        self.rope_partials = _rope_partials if rope else None
        self.triton_partials = _triton_partials

        def _merge():
            if merge == "torch":  # plain PyTorch log-sum-exp merge (benchmark comparison)
                rv = g * tq
                pl = self.pl[:, :, :rv] * LN2  # [BH, P, rv] natural log
                po = self.po[:, :, :rv]

                def lse_merge(lo, hi):
                    ls = pl[:, lo:hi]
                    tot = torch.logsumexp(ls, dim=1)
                    w = torch.exp(ls - torch.where(torch.isfinite(tot), tot, torch.zeros_like(tot))[:, None])
                    return (w[..., None] * po[:, lo:hi]).sum(1), tot

                oc, lc = lse_merge(0, p_coded)
                inv = inv_v.float() if inv_v.shape[0] == hkv else inv_v.float().expand(hkv, d, d)
                mv = mean_v.float() if mean_v.shape[0] == hkv else mean_v.float().expand(hkv, d)
                oc = (torch.einsum("xhrd,hde->xhre", oc.view(b, hkv, rv, d), inv) + mv[None, :, None]).reshape(b * hkv, rv, d)
                oe, le = lse_merge(p_coded, p_total)
                tot = torch.logaddexp(lc, le)
                safe = torch.where(torch.isfinite(tot), tot, torch.zeros_like(tot))
                o = torch.exp(lc - safe)[..., None] * torch.where(torch.isfinite(lc)[..., None], oc, 0) + \
                    torch.exp(le - safe)[..., None] * oe
                self.out.copy_(o.view(b, hkv, g, tq, d).reshape(b, hq, tq, d).to(self.out.dtype))
                self.lse.copy_(tot.view(b, hkv, g, tq).reshape(b, hq, tq))
                return
            if fuse:
                return  # merged by the last split program of each head
            _decode_merge_kernel[(b * hkv,)](
                self.po, self.pl, inv_v32, mean_v32, self.out, self.lse,
                self.out.stride(0), self.out.stride(1), self.out.stride(2), self.lse.stride(0), self.lse.stride(1),
                hkv, p_coded, p_total, p_slots, cbv_ph,
                G=g, TQ=tq, R_PAD=r_pad, D=d, PREC=prec, PB=8, num_warps=8,
            )

        self.prologue, self.partials, self.merge = _prologue, _partials, _merge

    def __call__(self) -> tuple[Tensor, Tensor]:
        if not self.empty:
            self.prologue()
            self.partials()
            self.merge()
        return self.out, self.lse


def decode_attention_triton(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    cent_k: Tensor, inv_k: Tensor, mean_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    **options,
) -> tuple[Tensor, Tensor]:
    """Launch the decode kernels; see the module docstring for the layout. Returns (out q.dtype, lse fp32).

    Options (DecodePlan): splits=(coded, exact) or split_mult, block_n, num_warps, num_stages,
    gather_cache (".ca" = keep centroid gathers in L1), submajor, rows_on_n, prologue ("triton"/"torch");
    v4 coded-loop options (key-LUT path only): prefetch (0/1/2), streams (1/2), lean, values_b, affine, maxnreg,
    merge_pb, and probe_tables (timing only, not exact); coded="cuda" runs the coded split programs as the CUDA
    C++ kernel of coded_decode.cu ("auto": where it supports the call, else Triton), with cuda_kernel
    ("warp"/"block"), cuda_copies, cuda_key_half (fp16 key table), cuda_db, cuda_mma, value_sel (int16
    [B, Hkv, n_cap] value-copy selection words of value_copies.py, made for the kernel's cuda_value_sel mode: speed
    only, the result does not depend on them, ignored by every other path); the exact programs
    (anchors, window): block_a (anchors per step), exact_splits (programs per KV head); out=(out, lse)
    preallocated; workspace (a dict: scratch buffers shared by calls that run one after another on one stream);
    poison=True fills the split partials with NaN first (tests)."""
    return DecodePlan(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k, win_v,
                      win_len, cent_k, inv_k, mean_k, cent_v, inv_v, mean_v, scale, **options)()


# ---------------------------------------------------------------------------------------------- reference
def anchor_mask_from_bits(anchor_bits: Tensor, n_cap: int) -> Tensor:
    """[B, Hkv, NW] int32 -> bool [B, Hkv, n_cap], True = anchor."""
    pos = torch.arange(n_cap, device=anchor_bits.device)
    words = anchor_bits[..., pos // 32]
    return ((words >> (pos % 32).to(words.dtype)) & 1).bool()


def bits_from_positions(anchor_pos: Tensor, n_cap: int) -> Tensor:
    """anchor_pos [B, Hkv, A] (-1 empty) -> anchor_bits [B, Hkv, ceil(n_cap/32)] int32."""
    b, h, _ = anchor_pos.shape
    nw = cdiv(max(n_cap, 1), 32)
    valid = anchor_pos >= 0
    pos = torch.where(valid, anchor_pos, 0).long()
    val = torch.where(valid, torch.ones_like(pos) << (pos % 32), torch.zeros_like(pos)).to(torch.int32)
    bits = torch.zeros(b, h, nw, dtype=torch.int32, device=anchor_pos.device)
    return bits.scatter_add_(2, pos // 32, val)


def decode_attention_reference(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    cent_k: Tensor, inv_k: Tensor, mean_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    value_mode: str = "histogram",
) -> tuple[Tensor, Tensor]:
    """The numerics references composed over the store buffers: (out in q.dtype, lse float32)."""
    b, hq, tq, d = q.shape
    n_cap = codes_k.shape[2]
    dev = q.device
    eye = torch.eye(d, device=dev)
    # encode-side transforms are not needed to attend: pass identity placeholders
    cb_k = Codebook(cent_k.float(), eye.expand_as(inv_k).float(), inv_k.float(), mean_k.float())
    cb_v = Codebook(cent_v.float(), eye.expand_as(inv_v).float(), inv_v.float(), mean_v.float())
    pos = torch.arange(n_cap, device=dev)
    visible = (pos[None, None, :] < n_coded.to(dev).long()[:, None, None]) & ~anchor_mask_from_bits(anchor_bits, n_cap)
    parts = [lut_attention(q, codes_k, codes_v, cb_k, cb_v, scale, visible[:, :, None, :], value_mode)]
    if anchor_k.shape[2]:
        parts.append(exact_attention(q, anchor_k, anchor_v, scale, (anchor_pos >= 0)[:, :, None, :]))
    w_cap = win_k.shape[2]
    wl = win_len.to(dev).long()
    jj = torch.arange(w_cap, device=dev)
    last = wl[:, None] - tq + torch.arange(tq, device=dev)[None, :]  # [B, Tq]
    wmask = (jj[None, None, :] <= last[:, :, None]) & (jj[None, None, :] < wl[:, None, None])  # [B, Tq, W]
    parts.append(exact_attention(q, win_k, win_v, scale, wmask[:, None]))
    out, lse = merge_partials(parts)
    return out.to(q.dtype), lse


def decode_attention(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """Triton where it can run on q's device, the reference otherwise (same arguments)."""
    return (decode_attention_triton if can_launch(args[0]) else decode_attention_reference)(*args, **kwargs)


__all__ = [
    "anchor_mask_from_bits", "bits_from_positions", "decode_attention", "decode_attention_reference",
    "decode_attention_triton", "default_splits", "exact_programs",
]
_ = (causal_mask, LN2)
