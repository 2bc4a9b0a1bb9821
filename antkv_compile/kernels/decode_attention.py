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

Algorithm (two launches: prologue, partials; the merge runs in the last partials program of each head):

* prologue, one program per (sequence, KV head): the queries in the key coding space,
  q' = q @ inverse_k^T and the bias q.mean_k (both times scale * log2 e); with G*Tq <= 8 a small kernel then
  builds the per-query fp32 key lookup table (``key_lut``).
* partials, grid (B * Hkv, P) with P = P_coded + P_exact; every program packs the G query heads of its
  KV head (times Tq) into the rows of one tile (padded to 16 for the tensor cores).
  - coded programs, with G*Tq <= 8 (the key-LUT loop): the key codes are read as 32- or 16-bit words, one
    token per thread, and the logits are sums of lookup-table rows; with more rows (or ``key_lut=False``) each block of
    tokens is dequantized *in coding space* by gathering one centroid per (token, sub-space) and the logits are
    one tensor-core product q' . k'. Values are accumulated in coding space the same way (gather, not a
    per-centroid histogram; NOTES.md has both costs). Coded tokens whose anchor bit is set are masked out.
  - exact programs: exact attention over a slice of the anchor slots (empty slots masked); the first one
    also attends the window (causal).
  - merge, in the last-arriving program of each (sequence, KV head) (arrival counter reset by the prologue):
    log-sum-exp of the coded partials, the value inverse transform + mean applied once, then the merge with the
    exact partials.

This Triton loop is the post-RoPE recipe's coded decode on every device. With ``rope_keys`` (the pre-RoPE recipe)
the coded programs are :mod:`.rope_decode`'s kernel instead and this module runs the exact programs and the merge.

No host synchronisation and no data-dependent shapes: the per-sequence lengths are read on the device,
each split covers ``ceil(n_coded[b] / P_coded)`` tokens, so the launch is CUDA-graph safe.
"""
from __future__ import annotations

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
                 BLOCK_N: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, CACHE: tl.constexpr):
        """Coding-space vectors [BLOCK_N, D] of the tokens offs_n: one centroid gather per sub-space."""
        s_idx = tl.arange(0, S)
        e_idx = tl.arange(0, SUB)
        if STAGES == 1:
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
                                PREC: tl.constexpr):
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

    # ------------------------------------------------------------------ the coded key-LUT loop (G*Tq <= 8)
    # Key codes read as 32/16-bit words, one token per thread, the sub-space sum of the LUT rows in registers (no
    # cross-lane shuffles, no replicated softmax), running sums per token slot reduced once after the loop
    # (NOTES.md "Coded decode, Triton": the fastest exact variant of the Triton loop).
    @triton.jit
    def _lut_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n0, lim, BLOCK_N: tl.constexpr, KW: tl.constexpr,
                   C_V: tl.constexpr):
        """Key code words [BLOCK_N, KW], value codes [BLOCK_N, C_V] and anchor-bit words [BLOCK_N] of the tokens
        n0 .. n0 + BLOCK_N - 1; tokens >= lim read as 0 (no memory access)."""
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
    def _lut_logits(LUT, lut_base, kc, rows_g, C_K: tl.constexpr, KW: tl.constexpr, CPW: tl.constexpr,
                    M_K: tl.constexpr, R_G: tl.constexpr, BLOCK_N: tl.constexpr, CACHE: tl.constexpr):
        """Logits [BLOCK_N, R_G] of one block: the key-LUT rows of every code, summed per token in registers. Code
        c of a token indexes LUT table c (= stage * S + sub-space), so multi-stage codebooks need nothing special."""
        wi = tl.arange(0, KW)
        kc32 = kc.to(tl.int32)
        out = tl.zeros([BLOCK_N, R_G], tl.float32)
        for c in tl.static_range(C_K):
            word = tl.sum(tl.where(wi[None, :] == c // CPW, kc32, 0), axis=1)  # the word holding code c
            code = (word >> (8 * (c % CPW))) & 255
            out += tl.load(LUT + lut_base + (c * M_K + code[:, None]) * R_G + rows_g[None, :], cache_modifier=CACHE)
        return out

    @triton.jit
    def _coded_lut_chunk(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, pair, cidx, HKV, N_CAP, NW, P_CODED, PS,
                         HCB_V, CBV_PER_HEAD, G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr,
                         D: tl.constexpr, C_K: tl.constexpr, KW: tl.constexpr, CPW: tl.constexpr, M_K: tl.constexpr,
                         C_V: tl.constexpr, S_V: tl.constexpr, M_V: tl.constexpr, SUB_V: tl.constexpr,
                         ST_V: tl.constexpr, R_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                         PREC: tl.constexpr, CACHE: tl.constexpr):
        """Coded chunk cidx (of P_CODED) of one (sequence, KV head) = pair through the key-LUT loop, stored as
        partial slot cidx."""
        b = pair // HKV
        h = pair % HKV
        n_b = tl.load(NCODED + b)
        chunk = tl.cdiv(tl.cdiv(n_b, P_CODED), BLOCK_N) * BLOCK_N
        start = cidx * chunk
        end = tl.minimum(start + chunk, n_b)
        hv = h * CBV_PER_HEAD
        lut_base = pair * (C_K * M_K * R_G)
        qc_base = pair * R_PAD * (D + 1)
        ck_base = pair * N_CAP * KW
        cv_base = pair * N_CAP * C_V
        bits_base = pair * NW
        rows_g = tl.arange(0, R_G)
        bias_g = tl.load(QC + qc_base + R_PAD * D + rows_g)
        n_tok = tl.maximum(end - start, 0)
        lim = tl.minimum(start + n_tok, end)
        n_blk = tl.cdiv(n_tok, BLOCK_N)
        m_t = tl.full([R_G], float("-inf"), tl.float32)
        acc_t = tl.zeros([D, R_G], tl.float32)
        l_t = tl.zeros([BLOCK_N, R_G], tl.float32)  # running sums per token slot
        c_idx = tl.arange(0, C_V)
        e_idx = tl.arange(0, SUB_V)
        tab = ((c_idx // S_V) * HCB_V + hv) * S_V + c_idx % S_V  # (stage, head, sub-space) table of value code c
        for it in range(0, n_blk):
            n0 = start + it * BLOCK_N
            kc, vc, word = _lut_codes(CK, CV, BITS, ck_base, cv_base, bits_base, n0, lim, BLOCK_N, KW, C_V)
            lg = _lut_logits(LUT, lut_base, kc, rows_g, C_K, KW, CPW, M_K, R_G, BLOCK_N, CACHE)
            # online softmax (base 2)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keep = (offs_n < lim) & (((word >> (offs_n % 32)) & 1) == 0)
            lg = tl.where(keep[:, None], lg + bias_g[None, :], float("-inf"))
            m_new = tl.maximum(m_t, tl.max(lg, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_t - m_use)
            p = tl.exp2(lg - m_use[None, :])
            l_t = l_t * alpha[None, :] + p
            m_t = m_new
            # values: one centroid gather per (token, code), summed over stages, acc^T [D, R_G] += vc^T p
            offs = (tab[None, :, None] * M_V + vc.to(tl.int32)[:, :, None]) * SUB_V + e_idx[None, None, :]
            x = tl.load(CENT_V + offs, cache_modifier=CACHE)
            if ST_V == 1:
                xs = x.to(DOT)
            else:
                xs = tl.sum(tl.reshape(x.to(tl.float32), [BLOCK_N, ST_V, S_V * SUB_V]), axis=1).to(DOT)
            vcs = tl.reshape(xs, [BLOCK_N, D])
            acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(vcs), p.to(DOT), input_precision=PREC)
        l_t = tl.sum(l_t, axis=0)
        _store_partial(PO, PL, pair, cidx, PS, tl.trans(acc_t), m_t, l_t, G * TQ, R_G, D, R_PAD)

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
        DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr, R_G: tl.constexpr,
        KLUT: tl.constexpr, PB: tl.constexpr, KC: tl.constexpr,
        KW: tl.constexpr = 1, CPW: tl.constexpr = 1, PID0=0,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1) + PID0  # PID0 = P_CODED: the coded partials came from the pre-RoPE kernel
        b = pid_bh // HKV
        h = pid_bh % HKV
        offs_d = tl.arange(0, D)
        rows = tl.arange(0, R_PAD)
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32)
        if pid_s < P_CODED:
            if KLUT:
                # ---------------------------------------------------------------- coded tokens, key-LUT loop
                _coded_lut_chunk(CK, CV, BITS, NCODED, LUT, CENT_V, QC, PO, PL, pid_bh, pid_s, HKV, N_CAP, NW,
                                 P_CODED, PS, HCB_V, CBV_PER_HEAD, G, TQ, R_PAD, D, ST_K * S_K, KW, CPW, M_K, C_V,
                                 S_V, M_V, SUB_V, ST_V, R_G, BLOCK_N, DOT, PREC, CACHE)
            else:
                # ---------------------------------------------------------------- coded tokens, dequantized
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
                qc = tl.load(QC + qc_base + rows[:, None] * D + offs_d[None, :]).to(DOT)
                bias = tl.load(QC + qc_base + R_PAD * D + rows)
                for n0 in range(start, end, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    nmask = offs_n < end
                    kc = _dequant(CK, ck_base, offs_n, nmask, C_K, CENT_K, hk, HCB_K, S_K, M_K, SUB_K, ST_K,
                                  BLOCK_N, D, DOT, CACHE)
                    logits = tl.dot(qc, tl.trans(kc), input_precision=PREC) + bias[:, None]
                    word = tl.load(BITS + bits_base + offs_n // 32, mask=nmask, other=0)
                    keep = nmask & (((word >> (offs_n % 32)) & 1) == 0)
                    logits = tl.where(keep[None, :], logits, float("-inf"))
                    p, alpha, m_i, l_i = _online_update(logits, m_i, l_i, acc)
                    vc = _dequant(CV, cv_base, offs_n, nmask, C_V, CENT_V, hv, HCB_V, S_V, M_V, SUB_V, ST_V,
                                  BLOCK_N, D, DOT, CACHE)
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
        # the last program of this (sequence, KV head) to finish merges all its partials (no merge launch)
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


LAST_LAUNCH: dict = {}  # the last compiled kernel per launcher (the benchmark reads registers / spills)
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def default_splits(batch: int, kv_heads: int, capacity: int, anchors: int, sms: int, block_n: int = 64,
                   mult: float = 1.0) -> tuple[int, int]:
    """(coded splits, exact splits) per (sequence, KV head).

    Measured on the H100 (NOTES.md "Coded decode, Triton"): the split loop is latency-bound per program, so more resident
    programs help (B = 32: 3 splits 6.5 ms, 1 split 7.5 ms at 128K; B = 8: 18 splits beat 9 by 23 %), while every
    split costs the merge a partial (B = 1: 32 splits beat 65 by 10-20 %). Hence
    clamp(8 * SMs / (B * Hkv), 3, 32); ``mult`` scales it (the benchmark sweeps it). One exact program
    (anchors + window) per KV head unless the anchors are a large share of the tokens.
    """
    pairs = max(1, batch * kv_heads)
    p_coded = max(1, int(min(32, max(3, cdiv(8 * sms, pairs))) * mult))  # v3: 8/SM (B=8: 18 splits beat 9)
    p_coded = max(1, min(p_coded, cdiv(capacity, 4 * block_n)))
    p_exact = max(1, cdiv(anchors * p_coded, max(1, capacity))) if anchors else 1
    return p_coded, p_exact


def exact_programs(pairs: int, capacity: int, anchors: int, coded_splits: int, sms: int) -> int:
    """Exact programs (anchors + window, then the merge) per (sequence, KV head) beside a separate coded kernel
    (the pre-RoPE path).

    At least the anchors' share of the coded splits; at small batches more, up to ~2 programs per multiprocessor
    in all and 8 per pair, and not fewer than 64 anchors each: one program per pair left the anchors of 128K
    tokens (1,311 per head) to 8 programs at B = 1, 0.041 of a 0.120 ms decode. Measured (NOTES.md "Exact programs,
    merge and launches (decode)", kernels_bench_decode_20261122-163927): 128K B=1 8 programs 0.090 ms, B=8 4
    programs 0.352 ms (from 0.371), B=32 and 32K B=128 unchanged with 1."""
    share = max(1, cdiv(anchors * coded_splits, max(1, capacity))) if anchors else 1
    fill = min(8, max(1, 2 * sms // max(1, pairs)), max(1, cdiv(anchors, 64)))
    return max(share, fill)


class DecodePlan:
    """The launches of one decode call, with their buffers (the benchmark times them one by one)."""

    def __init__(self, q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k, win_v,
                 win_len, cent_k, inv_k, mean_k, cent_v, inv_v, mean_v, scale, *, splits=None, block_n=64,
                 num_warps=4, num_stages=None, out=None, poison=False, gather_cache=".ca", split_mult=1.0,
                 key_lut=None, block_a=None, exact_splits=None, workspace=None,
                 rope_keys=None, rope_block_n=None, rope_impl=None):
        require_triton()
        # rope_keys = (pairs_k, freq_k, attention_scaling): pre-RoPE keys in RoPE-pair sub-spaces (rope_decode.py);
        # cent_k is then the key table with the mean folded in, inv_k / mean_k are unused (None)
        rope = rope_keys is not None
        b, hq, tq, d = q.shape
        hkv, n_cap = codes_k.shape[1], codes_k.shape[2]
        g = hq // hkv
        r_pad = max(16, next_pow2(g * tq))
        if r_pad > 128:
            raise ValueError(f"decode attention packs G*Tq = {g * tq} query rows per KV head; at most 128")
        a_cap, w_cap = anchor_k.shape[2], win_k.shape[2]
        st_k, hcb_k, s_k, m_k, sub_k = cent_k.shape
        st_v, hcb_v, s_v, m_v, sub_v = cent_v.shape
        if rope:
            from .rope_decode import rope_unsupported_reason

            reason = rope_unsupported_reason(q, cent_k, codes_k)
            if reason:
                raise ValueError(f"the pre-RoPE decode kernel cannot run this call: {reason}")
            rope_block_n = 64 if rope_block_n is None else int(rope_block_n)
            if splits is None:  # coded splits as the Triton loop's; exact programs as beside a separate coded kernel
                pc, _ = default_splits(b, hkv, n_cap, a_cap, sm_count(q), rope_block_n, mult=split_mult)
                splits = (pc, exact_programs(b * hkv, n_cap, a_cap, pc, sm_count(q)))
            key_lut = False
        if splits is None:
            splits = default_splits(b, hkv, n_cap, a_cap, sm_count(q), block_n, mult=split_mult)
        # beside the pre-RoPE coded kernel the Triton launch runs only the exact programs (anchors, window): measured
        # best with 64 anchors per step, pipelined (NOTES.md "Exact programs, merge and launches (decode)": 0.111 ->
        # 0.077 ms at 128K B=32); the Triton coded loop keeps its own measured best (32, unpipelined)
        exact_only = rope
        block_a = (64 if exact_only else 32) if block_a is None else int(block_a)
        num_stages = (2 if exact_only else 1) if num_stages is None else int(num_stages)
        p_coded, p_exact = splits
        p_exact = max(1, p_exact if exact_splits is None else int(exact_splits))
        p_total = p_coded + p_exact
        dev = q.device
        self.splits = (p_coded, p_exact)
        rv = g * tq
        if key_lut is None:
            key_lut = rv <= 8
        r_g = max(4, next_pow2(rv))  # rows of the key table and of the merge
        p_slots = p_total + 2  # two scratch slots for the merge
        c_k = codes_k.shape[3]
        cpw = (4 if c_k % 4 == 0 else 2 if c_k % 2 == 0 else 1) if key_lut else 1  # key codes per loaded word
        ck_plain = ck_arg = codes_k.contiguous()
        if cpw > 1:
            ck_arg = ck_arg.view(torch.int32 if cpw == 4 else torch.int16)

        def scratch(name, shape, dtype):
            """A scratch buffer, from ``workspace`` (a dict shared by plans that run one after another on one
            stream, e.g. the layers of a model) when given."""
            if workspace is None:
                return torch.empty(shape, dtype=dtype, device=dev)
            t = workspace.get(name)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != dev:
                t = workspace[name] = torch.empty(shape, dtype=dtype, device=dev)
            return t

        self.po = scratch("po", (b * hkv, p_slots, r_pad, d), torch.float32)
        self.pl = scratch("pl", (b * hkv, p_slots, r_pad), torch.float32)
        self.cnt = scratch("cnt", (max(1, b * hkv),), torch.int32)
        self.lut = scratch("lut", (b * hkv * st_k * s_k * m_k * r_g,), torch.float32) if key_lut else self.cnt
        if poison:
            self.po.fill_(float("nan"))
            self.pl.fill_(float("nan"))
        if out is None:
            out = (torch.empty(b, hq, tq, d, dtype=q.dtype, device=dev),
                   torch.empty(b, hq, tq, dtype=torch.float32, device=dev))
        self.out, self.lse = out
        # every entry is written by the Triton prologue
        if rope:
            self.qc = self.po  # no query transform: the coded kernel reads q itself (any fp32 tensor fills the slot)
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
            _decode_prologue_kernel[(b * hkv,)](
                q, inv_k32, mean_k32, qc, self.cnt, q.stride(0), q.stride(1), q.stride(2), hkv, cbk_ph, qk_scale,
                G=g, TQ=tq, R_PAD=r_pad, D=d, PREC=prec, num_warps=4,
            )
            if key_lut:
                _decode_lut_kernel[(b * hkv, st_k * s_k)](
                    qc, centk_arg, self.lut, hkv, hcb_k, cbk_ph,
                    R_PAD=r_pad, D=d, S=s_k, M=m_k, SUB=sub_k, ST=st_k, R_L=r_g, num_warps=4,
                )

        cv_arg, bits_arg, nc_arg, centv_arg = (codes_v.contiguous(), anchor_bits.contiguous(), n_coded.contiguous(),
                                               cent_v.contiguous())
        centk_arg = cent_k.contiguous()

        if rope:
            from .rope_decode import launch_rope_coded

            pairs_arg, freq_arg = rope_keys[0].contiguous(), rope_keys[1].float().contiguous()
            rope_cfg = dict(dot=dt, prec=prec, block_n=rope_block_n, cache=gather_cache, interpret=interpreting(),
                            impl=rope_impl)

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
                R_G=r_g, KLUT=key_lut, PB=8, KC=min(32, d), KW=c_k // cpw, CPW=cpw,
                PID0=p_coded if exact_only else 0, num_warps=num_warps, num_stages=num_stages,
            )

        def _partials():
            if rope:
                _rope_partials()
            _triton_partials()

        self.rope_partials = _rope_partials if rope else None  # the coded launch alone (timed by the benchmark)
        self.prologue, self.partials = _prologue, _partials

    def __call__(self) -> tuple[Tensor, Tensor]:
        if not self.empty:
            self.prologue()
            self.partials()
        return self.out, self.lse


def decode_attention_triton(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    cent_k: Tensor, inv_k: Tensor, mean_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    **options,
) -> tuple[Tensor, Tensor]:
    """Launch the decode kernels; see the module docstring for the layout. Returns (out q.dtype, lse fp32).

    Options (DecodePlan): splits=(coded, exact) or split_mult, block_n, num_warps, num_stages,
    gather_cache (".ca" = keep centroid gathers in L1), key_lut (None: the key-LUT loop where G*Tq <= 8);
    the exact programs (anchors, window): block_a (anchors per step), exact_splits (programs per KV head);
    out=(out, lse) preallocated; workspace (a dict: scratch buffers shared by calls that run one after another on
    one stream); poison=True fills the split partials with NaN first (tests); rope_keys, rope_block_n and
    rope_impl (the pre-RoPE path, rope_decode.py)."""
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
