"""Decode attention over pre-RoPE keys coded in RoPE-pair sub-spaces: the coded split programs.

Layout contract: :mod:`antkv_compile.numerics.rope_pairs`. The key codebook's map is a pair-layout permutation, so
sub-space ``s`` of the product quantizer holds the RoPE pairs ``pairs[h, s * sd/2 + i]``, coding dims ``(2i, 2i + 1)``
of the sub-space being the pair's (real, imaginary) parts = model dims ``(j, j + D/2)``. A coded token at cache slot
``p`` (its RoPE position) decodes, per coding pair ``c`` with model pair ``j = pairs[h, c]``, to

    (re, im) = sum over stages of the gathered centroid entries (+ the key mean, folded into the table)
    angle    = fp32(p * inv_freq[j])            (as Hugging Face computes it: fp32 position x fp32 frequency)
    k[j]        = re * cos(angle) a - im * sin(angle) a
    k[j + D/2]  = im * cos(angle) a + re * sin(angle) a          (a = attention_scaling; HF rotate_half)

and its logit for a (post-RoPE) query row is ``q . k``. The kernel never forms ``k`` in model space: the query rows
are loaded in coding order (``q[pairs]`` and ``q[pairs + D/2]``), so the logits of a tile of tokens are two
tensor-core products ``q_re . k_re^T + q_im . k_im^T`` of the G*Tq query rows (one tile of 16 rows serves the whole
GQA group: the dequantized, rotated keys are shared by the G query heads of the KV head).

Tables (built once per store by :func:`rope_key_tables`):

    table_k  [stages, H_cb, S, M, sd]   centroids in coding space, the mean (mapped to coding space) added to stage 0,
                                        in the kernel's dtype (fp16 on CUDA: 16 bytes per 1-bit gather; fp32 on CPU)
    pairs_k  [H_cb, D/2] int32          model pair of each coding pair
    freq_k   [H_cb, D/2] float32        inv_freq[pairs_k]: the frequency of each coding pair

One program per (sequence, KV head, split of the coded tokens), as the post-RoPE Triton loop
(:mod:`.decode_attention`): tokens whose anchor bit is set are masked, online softmax in base 2, values gathered in
their coding space exactly as that loop reads them, and the normalized partial (out, log2-sum-exp) written to the
slots that the existing exact programs (anchors, window) and the fused merge consume (:class:`.decode_attention.
DecodePlan` with ``rope_keys``; the post-RoPE prologue and key lookup table are not needed).

Trigonometry: the accurate ``__nv_cosf`` / ``__nv_sinf`` of libdevice (full range reduction: slots up to the fp32
integer limit 2^24) per (token, pair); under the interpreter the cos / sin are numpy's (``tl.cos`` / ``tl.sin``).

:func:`rope_decode_reference` is the PyTorch reference: decode + rotate + exact attention (+ anchors, window, merge).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.attention import causal_mask, exact_attention, merge_partials
from ..numerics.rope_pairs import pair_layout
from ..numerics.vq import Codebook
from ._common import HAS_TRITON, can_launch, tl, triton
from .decode_attention import _warn_once, anchor_mask_from_bits

if HAS_TRITON:
    from triton.language.extra import libdevice

    from .decode_attention import _dequant, _online_update, _store_partial

    @triton.jit
    def _cos_sin(x, TRIG: tl.constexpr):
        """cos and sin of fp32 angles: TRIG 0 = libdevice (accurate; GPU), 1 = tl.cos / tl.sin (the interpreter)."""
        if TRIG == 0:
            c = libdevice.cos(x)
            s = libdevice.sin(x)
        else:
            c = tl.cos(x)
            s = tl.sin(x)
        return c, s

    @triton.jit
    def _rope_keys(CK, ck_base, offs_n, nmask, TAB, hk, HCB, C_K: tl.constexpr, S_K: tl.constexpr,
                   M_K: tl.constexpr, SUB_K: tl.constexpr, ST_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Decoded pre-RoPE (re, im) [BLOCK_N, S_K, SUB_K/2] fp32 of the tokens offs_n: one SUB_K-wide vector gather
        per (token, sub-space, stage), split into its even / odd entries."""
        HALF: tl.constexpr = SUB_K // 2
        s_idx = tl.arange(0, S_K)
        e_idx = tl.arange(0, SUB_K)
        re = tl.zeros([BLOCK_N, S_K, HALF], tl.float32)
        im = tl.zeros([BLOCK_N, S_K, HALF], tl.float32)
        for st in tl.static_range(ST_K):
            code = tl.load(CK + ck_base + offs_n[:, None] * C_K + st * S_K + s_idx[None, :], mask=nmask[:, None],
                           other=0).to(tl.int32)  # [BLOCK_N, S_K]
            row = TAB + ((st * HCB + hk) * S_K + s_idx[None, :, None]) * (M_K * SUB_K) + code[:, :, None] * SUB_K
            x = tl.load(row + e_idx[None, None, :]).to(tl.float32)  # [BLOCK_N, S_K, SUB_K]
            a, b = tl.split(tl.reshape(x, [BLOCK_N, S_K, HALF, 2]))
            re += a
            im += b
        return re, im

    @triton.jit
    def _rope_coded_kernel(
        Q, CK, CV, BITS, NCODED, TAB_K, PAIRS, FREQ, CENT_V, PO, PL,
        s_qb, s_qh, s_qt, HKV, N_CAP, NW, P_CODED, PS, HCB_K, CBK_PH, HCB_V, CBV_PH, qk_scale, rope_scale,
        G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
        C_K: tl.constexpr, S_K: tl.constexpr, M_K: tl.constexpr, SUB_K: tl.constexpr, ST_K: tl.constexpr,
        C_V: tl.constexpr, S_V: tl.constexpr, M_V: tl.constexpr, SUB_V: tl.constexpr, ST_V: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CACHE: tl.constexpr, TRIG: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // HKV
        h = pid_bh % HKV
        hk = h * CBK_PH
        hv = h * CBV_PH
        HALF: tl.constexpr = SUB_K // 2
        DH: tl.constexpr = D // 2
        # the G*Tq query rows of this KV head in coding order, times scale * log2(e): q[pairs], q[pairs + D/2]
        rows = tl.arange(0, R_PAD)
        rg = rows // TQ
        rt = rows % TQ
        rvalid = rows < G * TQ
        j = tl.load(PAIRS + hk * DH + tl.arange(0, DH))
        qrow = Q + b * s_qb + (h * G + rg)[:, None] * s_qh + rt[:, None] * s_qt
        q_re = (tl.load(qrow + j[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32) * qk_scale).to(DOT)
        q_im = (tl.load(qrow + (j + DH)[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32) * qk_scale).to(DOT)
        s_idx = tl.arange(0, S_K)
        i_idx = tl.arange(0, HALF)
        freq = tl.load(FREQ + hk * DH + s_idx[:, None] * HALF + i_idx[None, :])  # [S_K, HALF] fp32
        # this program's share of the sequence's coded tokens
        n_b = tl.load(NCODED + b)
        chunk = tl.cdiv(tl.cdiv(n_b, P_CODED), BLOCK_N) * BLOCK_N
        start = pid_s * chunk
        end = tl.minimum(start + chunk, n_b)
        ck_base = pid_bh * N_CAP * C_K
        cv_base = pid_bh * N_CAP * C_V
        bits_base = pid_bh * NW
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            re, im = _rope_keys(CK, ck_base, offs_n, nmask, TAB_K, hk, HCB_K, C_K, S_K, M_K, SUB_K, ST_K, BLOCK_N)
            # the slot's RoPE angle per coding pair, in fp32 exactly as HF: float(position) * inv_freq
            ang = offs_n.to(tl.float32)[:, None, None] * freq[None, :, :]
            c, s = _cos_sin(ang, TRIG)
            c = c * rope_scale
            s = s * rope_scale
            k_re = tl.reshape(re * c - im * s, [BLOCK_N, DH]).to(DOT)
            k_im = tl.reshape(im * c + re * s, [BLOCK_N, DH]).to(DOT)
            logits = tl.dot(q_re, tl.trans(k_re), input_precision=PREC)
            logits = tl.dot(q_im, tl.trans(k_im), acc=logits, input_precision=PREC)  # [R_PAD, BLOCK_N]
            word = tl.load(BITS + bits_base + offs_n // 32, mask=nmask, other=0)
            keep = nmask & (((word >> (offs_n % 32)) & 1) == 0)
            logits = tl.where(keep[None, :], logits, float("-inf"))
            p, alpha, m_i, l_i = _online_update(logits, m_i, l_i, acc)
            vc = _dequant(CV, cv_base, offs_n, nmask, C_V, CENT_V, hv, HCB_V, S_V, M_V, SUB_V, ST_V, BLOCK_N, D, DOT,
                          CACHE)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vc, input_precision=PREC)
        _store_partial(PO, PL, pid_bh, pid_s, PS, acc, m_i, l_i, G * TQ, R_PAD, D, R_PAD)


# which coded kernel launch_rope_coded runs by default: "auto" = the CUDA C++ kernel (rope_decode.cu) where it
# supports the call, else Triton (NOTES.md "Pre-RoPE pair-layout decode"); DecodePlan(rope_impl=...) per call
DEFAULT_IMPL = "auto"


def launch_rope_coded(q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
                      table_k: Tensor, pairs_k: Tensor, freq_k: Tensor, cent_v: Tensor, po: Tensor, pl: Tensor,
                      p_coded: int, p_slots: int, r_pad: int, qk_scale: float, rope_scale: float, *, dot, prec: str,
                      block_n: int = 64, cache: str = ".ca", interpret: bool = False,
                      impl: str | None = None) -> object:
    """Launch the coded split programs (grid B * Hkv x p_coded) into the partial slots 0 .. p_coded - 1 of po/pl
    ([B * Hkv, p_slots, r_pad, D] / [B * Hkv, p_slots, r_pad]). All tensors contiguous, on one device.

    ``impl``: "auto" (default: the CUDA C++ kernel ``rope_decode.cu`` where it supports the call and NVRTC is
    available, else this module's Triton kernel), "cuda" (raise where it cannot run) or "triton". block_n and cache
    are options of the Triton kernel (the CUDA kernel factors the angle per 8-token group, fl(T w) + fl(d w): within
    1 ulp of HF's fp32 angle fl(p w), NOTES.md "CUDA C++ kernel"). Returns the launched kernel object (Triton's
    compiled kernel or a RopeDecodeCuda)."""
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in ("auto", "cuda", "triton"):
        raise ValueError(f"impl must be 'auto', 'cuda' or 'triton' (got {impl!r})")
    if impl != "triton":
        reason = "the Triton interpreter" if interpret else None
        if reason is None:
            from . import rope_decode_cuda as RC

            reason = RC.unsupported_reason(q, codes_k, codes_v, table_k, cent_v, anchor_bits, n_coded, r_pad)
        if reason is None:
            try:
                return RC.launch(q, codes_k, codes_v, anchor_bits, n_coded, table_k, pairs_k, freq_k, cent_v, po, pl,
                                 p_coded, p_slots, r_pad, qk_scale, rope_scale)
            except Exception as exc:  # noqa: BLE001 - NVRTC / driver failure: "auto" falls back to Triton
                if impl == "cuda":
                    raise
                reason = f"the CUDA kernel could not be built ({type(exc).__name__}: {exc})"
                _warn_once(reason + "; the Triton pre-RoPE kernel runs instead")
        elif impl == "cuda":
            raise ValueError(f"the CUDA pre-RoPE decode kernel cannot run this call: {reason}")
    b, hq, tq, d = q.shape
    hkv, n_cap = codes_k.shape[1], codes_k.shape[2]
    st_k, hcb_k, s_k, m_k, sub_k = table_k.shape
    st_v, hcb_v, s_v, m_v, sub_v = cent_v.shape
    return _rope_coded_kernel[(b * hkv, p_coded)](
        q, codes_k, codes_v, anchor_bits, n_coded, table_k, pairs_k, freq_k, cent_v, po, pl,
        q.stride(0), q.stride(1), q.stride(2), hkv, n_cap, anchor_bits.shape[2], p_coded, p_slots,
        hcb_k, int(hcb_k == hkv and hkv > 1), hcb_v, int(hcb_v == hkv and hkv > 1), qk_scale, float(rope_scale),
        G=hq // hkv, TQ=tq, R_PAD=r_pad, D=d,
        C_K=codes_k.shape[3], S_K=s_k, M_K=m_k, SUB_K=sub_k, ST_K=st_k,
        C_V=codes_v.shape[3], S_V=s_v, M_V=m_v, SUB_V=sub_v, ST_V=st_v,
        BLOCK_N=block_n, DOT=dot, PREC=prec, CACHE=cache, TRIG=1 if interpret else 0, num_warps=4, num_stages=1,
    )


def rope_unsupported_reason(q: Tensor, table_k: Tensor, codes_k: Tensor) -> str | None:
    """None when the Triton coded kernel runs these shapes, else why not."""
    d = q.shape[-1]
    st_k, hcb_k, s_k, m_k, sub_k = table_k.shape
    if sub_k % 2 or s_k * sub_k != d:
        return f"key sub-spaces of {sub_k} dims do not hold whole RoPE pairs of head_dim {d}"
    if d < 32 or d & (d - 1):
        return f"head_dim {d}: the kernel's products need a power of two >= 32"
    if codes_k.shape[3] != st_k * s_k:
        return f"{codes_k.shape[3]} key codes per token for a {st_k}-stage table of {s_k} sub-spaces"
    return None


# ------------------------------------------------------------------------------------------------ tables
def rope_key_tables(codebook: Codebook, inv_freq: Tensor, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(table_k [stages, H_cb, S, M, sd] in ``dtype``, pairs_k int32 [H_cb, D/2], freq_k float32 [H_cb, D/2]) of a
    pair-layout key codebook (module docstring). Raises ValueError for any other codebook."""
    cb = codebook
    pairs = pair_layout(cb.transform, cb.sub_dim)
    if pairs is None:
        raise ValueError("the key codebook is not in the RoPE-pair layout (numerics.rope_pairs): its coding map mixes "
                         "RoPE pairs or its sub-spaces split one")
    tr, inv = cb.transform.detach().float().cpu(), cb.inverse.detach().float().cpu()
    if not torch.equal(inv, tr.transpose(1, 2)):
        raise ValueError("the key codebook's inverse is not the transpose of its permutation map")
    if inv_freq.numel() != cb.head_dim // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies for head_dim {cb.head_dim}")
    h, d = cb.mean.shape
    meanc = torch.einsum("hd,hde->he", cb.mean.detach().float().cpu(), tr)  # the mean in coding space
    table = cb.centroids.detach().float().cpu().clone()
    table[0] += meanc.reshape(h, cb.num_subspaces, 1, cb.sub_dim)
    freq = inv_freq.detach().float().cpu()[pairs]
    dev = device if device is not None else cb.centroids.device
    return (table.to(device=dev, dtype=dtype).contiguous(), pairs.to(device=dev, dtype=torch.int32).contiguous(),
            freq.to(dev).contiguous())


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, rope_scale: float) -> tuple[Tensor, Tensor]:
    """cos / sin [..., D] (model order, HF layout) of the default RoPE at integer ``positions`` [...], exactly as
    :class:`antkv_compile.numerics.rope.InvFreqRope` (and HF) compute them: fp32 position x fp32 frequency."""
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * rope_scale, emb.sin() * rope_scale


def decode_rope_keys(codes_k: Tensor, table_k: Tensor, pairs_k: Tensor, freq_k: Tensor, rope_scale: float,
                     lo: int = 0) -> Tensor:
    """Post-RoPE keys [B, H, n, D] float32 of the codes [B, H, n, C] at slots lo .. lo + n - 1 (decode, rotate)."""
    b, h, n, _ = codes_k.shape
    st_k, hcb, s_k, m_k, sub = table_k.shape
    d = s_k * sub
    dev = codes_k.device
    tab = table_k.float().to(dev)
    if hcb != h:
        tab = tab.expand(st_k, h, s_k, m_k, sub)
    pairs = pairs_k.long().to(dev).expand(h, d // 2)
    freq = freq_k.float().to(dev).expand(h, d // 2)
    idx = codes_k.reshape(b, h, n, st_k, s_k).long()
    hh = torch.arange(h, device=dev)[None, :, None, None]
    ss = torch.arange(s_k, device=dev)[None, None, None, :]
    x = torch.zeros(b, h, n, s_k, sub, device=dev)
    for st in range(st_k):
        x += tab[st][hh, ss, idx[:, :, :, st]]
    re, im = x.reshape(b, h, n, d // 2, 2).unbind(-1)
    ang = torch.arange(lo, lo + n, device=dev).float()[None, :, None] * freq[:, None, :]  # [H, n, D/2]
    c, s = ang.cos() * rope_scale, ang.sin() * rope_scale
    k = torch.empty(b, h, n, d, device=dev)
    ix = pairs[None, :, None, :].expand(b, h, n, d // 2)
    k.scatter_(3, ix, re * c - im * s)
    k.scatter_(3, ix + d // 2, im * c + re * s)
    return k


_REF_CHUNK = 8192  # coded tokens decoded at a time by the reference (bounds its transient buffers)


def rope_decode_reference(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    table_k: Tensor, pairs_k: Tensor, freq_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    rope_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Decode + rotate + exact attention over the coded tokens that are not anchors, exact attention over the
    anchors and the window (causal), merged: (out in q.dtype, lse float32). Same layout as the Triton path."""
    b, hq, tq, d = q.shape
    n_cap = codes_k.shape[2]
    dev = q.device
    eye = torch.eye(d, device=dev)
    cb_v = Codebook(cent_v.float(), eye.expand_as(inv_v).float(), inv_v.float(), mean_v.float())
    visible = (torch.arange(n_cap, device=dev)[None, None, :] < n_coded.to(dev).long()[:, None, None]) \
        & ~anchor_mask_from_bits(anchor_bits, n_cap)
    parts = []
    for lo in range(0, n_cap, _REF_CHUNK):
        hi = min(n_cap, lo + _REF_CHUNK)
        k = decode_rope_keys(codes_k[:, :, lo:hi], table_k, pairs_k, freq_k, rope_scale, lo)
        v = cb_v.decode(codes_v[:, :, lo:hi])
        parts.append(exact_attention(q, k, v, scale, visible[:, :, None, lo:hi]))
    if anchor_k.shape[2]:
        parts.append(exact_attention(q, anchor_k, anchor_v, scale, (anchor_pos >= 0)[:, :, None, :]))
    wl = win_len.to(dev).long()
    jj = torch.arange(win_k.shape[2], device=dev)
    last = wl[:, None] - tq + torch.arange(tq, device=dev)[None, :]  # [B, Tq]
    wmask = (jj[None, None, :] <= last[:, :, None]) & (jj[None, None, :] < wl[:, None, None])
    parts.append(exact_attention(q, win_k, win_v, scale, wmask[:, None]))
    out, lse = merge_partials(parts)
    return out.to(q.dtype), lse


def rope_decode_triton(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    table_k: Tensor, pairs_k: Tensor, freq_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    rope_scale: float = 1.0, **options,
) -> tuple[Tensor, Tensor]:
    """The GPU launches (the coded programs: the CUDA C++ kernel where it runs, else this module's Triton kernel;
    then the exact programs and fused merge of :class:`.decode_attention.DecodePlan`). Options: those of DecodePlan
    (splits, split_mult, exact_splits, block_a, out, workspace, poison, ...), rope_impl ("auto", "cuda", "triton")
    and rope_block_n (the Triton kernel's)."""
    from .decode_attention import DecodePlan

    return DecodePlan(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k, win_v,
                      win_len, table_k, None, None, cent_v, inv_v, mean_v, scale,
                      rope_keys=(pairs_k, freq_k, float(rope_scale)), **options)()


def rope_decode(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """Triton where it can run on q's device, the reference otherwise (same arguments)."""
    return (rope_decode_triton if can_launch(args[0]) else rope_decode_reference)(*args, **kwargs)


__all__ = ["decode_rope_keys", "launch_rope_coded", "rope_cos_sin", "rope_decode", "rope_decode_reference",
           "rope_decode_triton", "rope_key_tables", "rope_unsupported_reason"]
_ = causal_mask
