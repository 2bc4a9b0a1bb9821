"""Launcher of the CUDA C++ pre-RoPE coded-decode kernel (``rope_decode.cu``), dispatched by
:func:`antkv_compile.kernels.rope_decode.launch_rope_coded` where it supports the call (else the Triton kernel runs).

Same inputs and the same partial slots as the Triton ``_rope_coded_kernel``; compiled at run time by NVRTC
(``cuda_rtc.py``), launched on PyTorch's current stream (CUDA-graph capturable). Design and floors: NOTES.md
"Pre-RoPE pair-layout decode".
"""
from __future__ import annotations

import functools
import struct
from importlib import resources

import torch

SMEM_LIMIT = 227 * 1024  # Hopper / Ampere opt-in maximum per block
_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# threads per CTA (one CTA per SM: the two tables take 128 KB at 1 bit): 256 = 8 warps of 194 registers, no spills,
# measured best on the H200 (0.122 / 2.493 ms at 128K B=1 / 32 against 0.125 / 2.510 at 384 threads;
# kernels_bench_rope_20261203-225717); 512 spills. NOTES.md "CUDA C++ kernel"
THREADS = 256


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return resources.files(__package__).joinpath("rope_decode.cu").read_text()


def layout(d: int, sk: int, mk: int, subk: int, cv: int, mv: int, subv: int, rv: int, tq: int, kt: torch.dtype,
           ct: torch.dtype, qt: torch.dtype, threads: int = THREADS) -> dict[str, int]:
    """Compile-time constants and the dynamic shared memory (``_smem``) of one configuration."""
    nwarp = threads // 32
    tables = sk * mk * subk * 2 + cv * mv * subv * 2
    tabb = max(tables, nwarp * 8 * d * 4)
    tabb = (tabb + 15) // 16 * 16
    # per warp: the tile's R(-T w) entries (4 groups x D/2 pairs x 8 B), two tiles of key and value codes
    smem = tabb + nwarp * (4 * (d // 2) * 8 + 64 * sk + 64 * cv) + 2 * nwarp * 8 * 4
    return {"D": d, "SK": sk, "MK": mk, "SUBK": subk, "CK": sk, "CV": cv, "MV": mv, "SUBV": subv, "RV": rv, "TQ": tq,
            "NT": threads, "KT": _DT[kt], "CT": _DT[ct], "QT": _DT[qt], "TABB": tabb, "_smem": smem}


def shape_reason(q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, table_k: torch.Tensor,
                 cent_v: torch.Tensor, r_pad: int, threads: int | None = None) -> str | None:
    """Why the CUDA kernel cannot run these shapes / dtypes (None: it can). No device needed."""
    b, hq, tq, d = q.shape
    hkv = codes_k.shape[1]
    st_k, _, s_k, m_k, sub_k = table_k.shape
    st_v, _, s_v, m_v, sub_v = cent_v.shape
    rv = (hq // hkv) * tq
    if rv > 8:
        return f"G*Tq = {rv} query rows per KV head (the kernel's MMA holds 8)"
    if d % 16 or d > 256:
        return f"head_dim {d} (needs a multiple of 16, at most 256)"
    if st_k != 1 or st_v != 1:
        return "multi-stage codebooks"
    if sub_k not in (8, 16) or s_k * sub_k != d:
        return f"key sub-spaces of {sub_k} dims (needs 8 or 16, {s_k} x {sub_k} = {d})"
    if sub_v not in (8, 16) or s_v * sub_v != d:
        return f"value sub-spaces of {sub_v} dims (needs 8 or 16, {s_v} x {sub_v} = {d})"
    ck, cv = codes_k.shape[3], codes_v.shape[3]
    if ck != s_k or ck not in (4, 8, 16) or cv != s_v or cv not in (4, 8, 16):
        return f"{ck} key / {cv} value codes per token (the kernel reads 4, 8 or 16, one per sub-space)"
    if m_k > 256 or m_v > 256:
        return "more than 256 centroids"
    if codes_k.dtype != torch.uint8 or codes_v.dtype != torch.uint8:
        return "codes not uint8"
    for name, t in (("key table", table_k), ("value centroids", cent_v), ("query", q)):
        if t.dtype not in _DT:
            return f"{name} dtype {t.dtype}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} queries (the kernel's logits are fp16 tensor-core products; the Triton kernel keeps fp32)"
    if r_pad < 8:
        return f"{r_pad} rows per partial slot"
    lay = layout(d, s_k, m_k, sub_k, cv, m_v, sub_v, rv, tq, table_k.dtype, cent_v.dtype, q.dtype,
                 threads or THREADS)
    if lay["_smem"] > SMEM_LIMIT:
        return f"{lay['_smem']} bytes of shared memory (at most {SMEM_LIMIT})"
    return None


def unsupported_reason(q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, table_k: torch.Tensor,
                       cent_v: torch.Tensor, anchor_bits: torch.Tensor, n_coded: torch.Tensor, r_pad: int,
                       threads: int | None = None) -> str | None:
    """Why the CUDA kernel cannot run this call (None: it can): shapes, dtypes, device, NVRTC."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if q.stride(-1) != 1:
        return "query not contiguous in its last dimension"
    if anchor_bits.dtype != torch.int32 or n_coded.dtype != torch.int32:
        return "anchor bits / n_coded not int32"
    reason = shape_reason(q, codes_k, codes_v, table_k, cent_v, r_pad, threads)
    if reason is None:
        props = torch.cuda.get_device_properties(q.device)
        if props.major < 8:
            reason = f"compute capability {props.major}.{props.minor} (needs 8.0+)"
    if reason is None:
        try:
            from .cuda_rtc import nvrtc

            nvrtc()
        except Exception as exc:  # noqa: BLE001
            reason = f"NVRTC is not available ({type(exc).__name__}: {exc})"
    return reason


class RopeDecodeCuda:
    """One compiled kernel (per configuration and device) and its launch."""

    def __init__(self, device: torch.device, lay: dict[str, int]):
        from .cuda_rtc import load_kernel

        lay = dict(lay)
        self.smem = lay.pop("_smem")
        self.threads = lay["NT"]
        self.kernel = load_kernel(_source(), "antkv_rope_coded", device, lay, self.smem)

    @property
    def regs(self) -> int:
        return self.kernel.regs

    @property
    def local_bytes(self) -> int:
        return self.kernel.local_bytes


@functools.lru_cache(maxsize=None)
def rope_decode_kernel(device: torch.device, key: tuple) -> RopeDecodeCuda:
    return RopeDecodeCuda(device, dict(key))


def launch(q, codes_k, codes_v, anchor_bits, n_coded, table_k, pairs_k, freq_k, cent_v, po, pl, p_coded: int,
           p_slots: int, r_pad: int, qk_scale: float, rope_scale: float, threads: int | None = None) -> RopeDecodeCuda:
    """Launch grid (B * Hkv, p_coded) into the partial slots 0 .. p_coded - 1 of po / pl. Call
    :func:`unsupported_reason` first."""
    b, hq, tq, d = q.shape
    hkv, n_cap = codes_k.shape[1], codes_k.shape[2]
    _, hcb_k, s_k, m_k, sub_k = table_k.shape
    _, hcb_v, s_v, m_v, sub_v = cent_v.shape
    lay = layout(d, s_k, m_k, sub_k, codes_v.shape[3], m_v, sub_v, (hq // hkv) * tq, tq, table_k.dtype, cent_v.dtype,
                 q.dtype, threads or THREADS)
    ker = rope_decode_kernel(q.device, tuple(sorted(lay.items())))
    scale_bits = struct.unpack("<i", struct.pack("<f", float(qk_scale) * float(rope_scale)))[0]
    ker.kernel((b * hkv, p_coded, 1), ker.threads, ker.smem,
               [q, codes_k, codes_v, anchor_bits, n_coded, table_k, pairs_k, freq_k, cent_v, po, pl,
                q.stride(0), q.stride(1), q.stride(2), hkv, n_cap, anchor_bits.shape[2], p_coded, p_slots, r_pad,
                int(hcb_k == hkv and hkv > 1), int(hcb_v == hkv and hkv > 1), scale_bits])
    return ker


__all__ = ["RopeDecodeCuda", "cos_sin_probe", "launch", "layout", "rope_decode_kernel", "shape_reason", "unsupported_reason"]


def cos_sin_probe(pos: torch.Tensor, w: torch.Tensor, sfu: bool = False) -> torch.Tensor:
    """[n, nw, 2] (cos, sin) of fl(pos * w) as the kernel computes them (a test probe: float32 CUDA tensors):
    ``sfu`` False: the exact polynomial path (the per-lane key factor R(fl(d w))), True: the special-function-unit
    path of the per-group factor R(fl(T w))."""
    from .cuda_rtc import load_kernel

    lay = layout(128, 16, 256, 8, 16, 256, 8, 4, 1, torch.float16, torch.float16, torch.float16, 256)
    lay.pop("_smem")
    ker = load_kernel(_source(), "antkv_rope_cos_sin_probe", pos.device, lay, 0)
    out = torch.empty(pos.numel(), w.numel(), 2, device=pos.device, dtype=torch.float32)
    total = pos.numel() * w.numel()
    ker(((total + 255) // 256, 1, 1), 256, 0,
        [pos.contiguous(), w.contiguous(), out, pos.numel(), w.numel(), int(sfu)])
    return out
