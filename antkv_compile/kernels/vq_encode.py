"""VQ encode: nearest centroid per sub-vector, all residual stages, in one kernel.

Reference: :meth:`antkv_compile.numerics.vq.Codebook.encode_coding_space` (codes and coding-space
residual) and ``Codebook.decode(codes) - x`` (the reconstruction error the Anchor Score needs).

The kernel takes vectors already in coding space (x' = (x - mean) @ transform, one batched matmul
done by the launcher) and, per token block and sub-space, computes the distances to the M centroids
as ``|c|^2 - 2 r.c`` with one small matrix product (sub-vectors padded to 16 columns for the
tensor-core shape), takes the argmin, subtracts the chosen centroid and goes on with the next
stage. It writes the codes (uint8) and the coding-space residual; the launcher maps the residual back
to the original space (``x_hat - x = -r' @ inverse``), a second batched matmul.

Ties and near-ties: the distance is summed in another order than the reference's einsum, so a code
may differ from the reference's where two centroids are equally near (within float rounding); the
tests check that the chosen centroid is as near as the reference's, not that the indices agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.vq import Codebook
from ._common import HAS_TRITON, can_launch, cdiv, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _vq_encode_kernel(
        XC, CENT, CODES, RES,
        T, H, CB_PER_HEAD, HCB,
        s_xb, s_xh, s_xt,
        s_cb, s_ch, s_ct,
        D: tl.constexpr, SUB: tl.constexpr, SUB_PAD: tl.constexpr, S: tl.constexpr, M: tl.constexpr,
        STAGES: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hc = h * CB_PER_HEAD
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        offs_e = tl.arange(0, SUB_PAD)
        emask = offs_e < SUB
        offs_m = tl.arange(0, M)
        x_base = XC + b * s_xb + h * s_xh + offs_t[:, None] * s_xt
        c_base = CODES + b * s_cb + h * s_ch + offs_t * s_ct
        r_base = RES + b * s_xb + h * s_xh + offs_t[:, None] * s_xt
        for s in range(S):
            r = tl.load(x_base + s * SUB + offs_e[None, :], mask=tmask[:, None] & emask[None, :], other=0.0)
            for st in tl.static_range(STAGES):
                cent = CENT + ((st * HCB + hc) * S + s) * (M * SUB)
                c_t = tl.load(cent + offs_m[None, :] * SUB + offs_e[:, None], mask=emask[:, None], other=0.0)
                c_t = c_t.to(tl.float32)  # [SUB_PAD, M]
                c2 = tl.sum(c_t * c_t, axis=0)
                dots = tl.dot(r, c_t, input_precision="ieee")  # [BLOCK_T, M]
                dist = c2[None, :] - 2.0 * dots
                idx = tl.argmin(dist, axis=1)
                tl.store(c_base + st * S + s, idx.to(tl.uint8), mask=tmask)
                chosen = tl.load(cent + idx[:, None] * SUB + offs_e[None, :], mask=emask[None, :], other=0.0)
                r = r - chosen.to(tl.float32)
            tl.store(r_base + s * SUB + offs_e[None, :], r, mask=tmask[:, None] & emask[None, :])


def _per_head(t: Tensor, h: int) -> Tensor:
    return t if t.shape[0] == h else t.expand(h, *t.shape[1:])


def to_coding_space(x: Tensor, transform: Tensor, mean: Tensor) -> Tensor:
    """x [B, H, T, D] -> (x - mean) @ transform, float32 (one batched matmul)."""
    h = x.shape[1]
    return torch.einsum("bhtd,hde->bhte", x.float() - _per_head(mean.float(), h)[None, :, None, :],
                        _per_head(transform.float(), h))


def vq_encode_coding_space_triton(xc: Tensor, centroids: Tensor, block_t: int = 64, *,
                                  out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """xc [B, H, T, D] float32 in coding space -> (codes uint8 [B, H, T, stages*S], residual' float32).

    ``out``: preallocated (codes, residual) to write into (the tests poison them)."""
    require_triton()
    b, h, t, d = xc.shape
    stages, hcb, s, m, sub = centroids.shape
    if m > 256:
        raise ValueError(f"codes are uint8: at most 256 centroids, got {m}")
    if s * sub != d or hcb not in (1, h):
        raise ValueError(f"centroids {tuple(centroids.shape)} do not fit vectors {tuple(xc.shape)}")
    xc = xc.float().contiguous()
    cent = centroids.contiguous()
    if out is None:
        codes = torch.empty(b, h, t, stages * s, dtype=torch.uint8, device=xc.device)
        res = torch.empty_like(xc)
    else:
        codes, res = out
    if t == 0 or b * h == 0:
        return codes, res
    grid = (cdiv(t, block_t), b * h)
    _vq_encode_kernel[grid](
        xc, cent, codes, res, t, h, 1 if hcb == h and h > 1 else 0, hcb,
        xc.stride(0), xc.stride(1), xc.stride(2),
        codes.stride(0), codes.stride(1), codes.stride(2),
        D=d, SUB=sub, SUB_PAD=max(16, sub), S=s, M=m, STAGES=stages, BLOCK_T=block_t,
        num_warps=4,
    )
    return codes, res


def vq_encode_triton(x: Tensor, centroids: Tensor, transform: Tensor, inverse: Tensor, mean: Tensor,
                     block_t: int = 64) -> tuple[Tensor, Tensor]:
    """x [B, H, T, D] -> (codes uint8 [B, H, T, stages*S], x_hat - x float32 [B, H, T, D])."""
    xc = to_coding_space(x, transform, mean)
    codes, res = vq_encode_coding_space_triton(xc, centroids, block_t)
    dx = -torch.einsum("bhtd,hde->bhte", res, _per_head(inverse.float(), x.shape[1]))
    return codes, dx


def vq_encode_reference(x: Tensor, centroids: Tensor, transform: Tensor, inverse: Tensor, mean: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """The same contract through :class:`Codebook` (plain PyTorch): (codes, decode(codes) - x)."""
    cb = Codebook(centroids.float(), transform.float(), inverse.float(), mean.float())
    codes, _ = cb.encode_coding_space(cb.to_coding_space(x))
    codes = codes.to(torch.uint8)
    return codes, cb.decode(codes) - x.float()


def vq_encode(x: Tensor, centroids: Tensor, transform: Tensor, inverse: Tensor, mean: Tensor
              ) -> tuple[Tensor, Tensor]:
    """Triton where it can run on x's device, the reference otherwise."""
    if can_launch(x):
        return vq_encode_triton(x, centroids, transform, inverse, mean)
    return vq_encode_reference(x, centroids, transform, inverse, mean)
