"""Launcher of the CUDA C++ coded-decode kernel (``coded_decode.cu``), the ``coded="cuda"`` option of
:class:`~antkv_compile.kernels.decode_attention.DecodePlan`.

It replaces only the coded split programs of the Triton decode: the prologue is the Triton kernel's (same
buffers), the key lookup table is built by the kernel itself, the CUDA kernel writes the coded partials into the same slots and counts its arrivals, and the Triton kernel
then runs the exact programs (anchors, window) whose last arrival merges all partials. Its reference is therefore the same as the Triton decode's
(:func:`~antkv_compile.kernels.decode_attention.decode_attention_reference`); tests/test_cuda.py checks it
on a GPU. Why CUDA here and not Triton: NOTES.md ("Coded decode, Triton", "Coded decode, CUDA C++ (post-RoPE
LUT)").
"""
from __future__ import annotations

import functools
import math
from importlib import resources

import torch

from ._common import cdiv

_CT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SMEM_LIMIT = 227 * 1024  # Hopper / Ampere opt-in maximum per block


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return resources.files(__package__).joinpath("coded_decode.cu").read_text()


# The kernel's key lookup table is fp16 (NOTES.md "Coded decode, CUDA C++ (post-RoPE LUT)": half the table's
# shared-memory traffic; its rounding, 2^-12 relative per entry summed in fp32, is measured there) and, where it
# keeps 2 copies of the value table (1 bit),
# copy 1 is copy 0 shifted by 4 bank groups and each coded token's selection word (value_copies.py) picks the copy
# of each of its rows (NOTES.md "Value-copy selection words": selection mode 2).
KEY_HALF = 1
VALUE_SEL = 2


@functools.lru_cache(maxsize=None)
def warp_layout(ck: int, mk: int, cv: int, mv: int, subv: int, cent_dtype: torch.dtype,
                key: tuple[int, int, torch.dtype] = (16, 8, torch.float16), key_half: int = KEY_HALF) -> dict[str, int]:
    """Constants and shared memory of the kernel (``antkv_coded_warp``): 16 warps, one CTA per SM, the value
    table stored as 16-bit in as many copies of 1, 2, 4, 8 as fit. ``key`` = (sub-spaces per stage, their
    dimension, dtype) of the key centroids, from which the kernel builds its lookup table, sized as fp16 (128
    bytes per code, the kernel's) or with ``key_half=0`` as fp32 (16 bytes per code and sub-space: the
    conservative size :func:`shape_reason` checks). At 2 copies the kernel reads the value-copy selection words
    (SEL = VALUE_SEL)."""
    nt, nwarp = 512, 16
    lut = mk * 128 if key_half else ck * mk * 16
    table = cv * mv * subv * 2
    tiles = nwarp * (4 * 32 * 2 + 32 * cv) + 2 * nwarp * 16
    fits = [c for c in (1, 2, 4, 8) if lut + c * table + tiles <= SMEM_LIMIT]
    ncopy = fits[-1] if fits else 1
    smem = lut + ncopy * table + tiles
    return {"CK": ck, "MK": mk, "CV": cv, "MV": mv, "SUBV": subv, "NT": nt, "MINB": 1, "CT": _CT[cent_dtype],
            "RPAD": 16, "NCOPY": ncopy, "SK": key[0], "SUBK": key[1], "CTK": _CT[key[2]],
            "SEL": VALUE_SEL if ncopy == 2 else 0,
            "_smem": smem, "_reduce": nwarp * 4 * cv * subv * 4, "_reduce_room": lut + ncopy * table}


def unsupported_reason(q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, cent_k: torch.Tensor,
                       cent_v: torch.Tensor, r_pad: int) -> str | None:
    """Why the CUDA coded kernel cannot run this call (None: it can)."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    reason = shape_reason(q, codes_k, codes_v, cent_k, cent_v, r_pad)
    if reason is None:
        props = torch.cuda.get_device_properties(q.device)
        if props.major < 8:
            reason = f"compute capability {props.major}.{props.minor} (needs 8.0+)"
    return reason


def shape_reason(q: torch.Tensor, codes_k: torch.Tensor, codes_v: torch.Tensor, cent_k: torch.Tensor,
                 cent_v: torch.Tensor, r_pad: int) -> str | None:
    """The shape / dtype part of :func:`unsupported_reason` (no device needed)."""
    b, hq, tq, d = q.shape
    hkv = codes_k.shape[1]
    if (hq // hkv) * tq > 4:
        return f"G*Tq = {(hq // hkv) * tq} query rows per KV head (the kernel packs at most 4)"
    st_k, _, s_k, m_k, _ = cent_k.shape
    st_v, _, s_v, m_v, sub_v = cent_v.shape
    ck, cv = codes_k.shape[3], codes_v.shape[3]
    if ck not in (8, 16) or cv not in (8, 16):
        return f"{ck} key / {cv} value codes per token (the kernel reads 8 or 16)"
    if st_v != 1:
        return "multi-stage value codebooks"
    if m_k > 256 or m_v > 256:
        return "more than 256 centroids"
    if cent_v.dtype not in _CT:
        return f"centroid dtype {cent_v.dtype}"
    esize = cent_v.element_size()
    if (sub_v * esize) % 16 or cv * sub_v != d:
        return f"value sub-space of {sub_v} x {esize} bytes (needs whole 16-byte rows, {cv} x {sub_v} = {d})"
    if r_pad != 16:
        return f"{r_pad} rows per partial slot"
    if sub_v not in (8, 16):
        return f"value sub-spaces of {sub_v} dimensions (the tensor-core kernel takes 8 or 16)"
    sub_k = cent_k.shape[4]
    if cent_k.dtype not in _CT or (sub_k * cent_k.element_size()) % 16 or s_k * sub_k != d:
        return f"key sub-spaces of {sub_k} x {cent_k.dtype} (needs whole 16-byte rows, {s_k} x {sub_k} = {d})"
    lay = warp_layout(ck, m_k, cv, m_v, sub_v, cent_v.dtype, (s_k, sub_k, cent_k.dtype), key_half=0)
    if lay["_smem"] > SMEM_LIMIT or lay["_reduce"] > lay["_reduce_room"]:
        return f"{lay['_smem']} bytes of shared memory"
    return None


def selection_mode(cent_k: torch.Tensor, cent_v: torch.Tensor, codes_k: int, codes_v: int) -> int:
    """The value-copy selection mode (value_copies.py) the CUDA kernel uses for these codebooks: 0 (none: it keeps
    1, 4 or 8 copies of the value table, or would not run them) or VALUE_SEL. Shapes only: no device, no
    compile, no environment."""
    st_k, _, s_k, m_k, sub_k = cent_k.shape
    _, _, _, m_v, sub_v = cent_v.shape
    if sub_v not in (8, 16) or codes_k not in (8, 16) or codes_v not in (8, 16):
        return 0
    if m_k > 256 or m_v > 256 or cent_v.dtype not in _CT or cent_k.dtype not in _CT:
        return 0
    lay = warp_layout(codes_k, m_k, codes_v, m_v, sub_v, cent_v.dtype, (s_k, sub_k, cent_k.dtype))
    return lay["SEL"] if lay["_smem"] <= SMEM_LIMIT else 0


def cuda_splits(pairs: int, capacity: int, sms: int, ctas_per_sm: int, waves: float = 4.0) -> int:
    """Coded chunks per (sequence, KV head): about ``waves`` waves of CTAs (the tail of a partial wave costs
    little at four), chunks of at least 1024 tokens (each CTA first loads its two tables, up to 128 KB)."""
    p = cdiv(math.ceil(waves * sms * ctas_per_sm), max(1, pairs))
    return max(1, min(p, 64, cdiv(max(capacity, 1), 1024)))


@functools.lru_cache(maxsize=None)
def coded_decode_kernel(device: torch.device, ck: int, mk: int, cv: int, mv: int, subv: int, cent_dtype: torch.dtype,
                        key: tuple[int, int, torch.dtype] = (16, 8, torch.float16)) -> "CodedDecodeCuda":
    """One compiled kernel object per configuration and process (decode builds a plan every call)."""
    return CodedDecodeCuda(device, ck, mk, cv, mv, subv, cent_dtype, key)


class CodedDecodeCuda:
    """Compiled kernel + launch geometry for one (codebook shape, centroid dtype, device)."""

    def __init__(self, device: torch.device, ck: int, mk: int, cv: int, mv: int, subv: int,
                 cent_dtype: torch.dtype, key: tuple[int, int, torch.dtype] = (16, 8, torch.float16)):
        from .cuda_rtc import load_kernel

        lay = dict(warp_layout(ck, mk, cv, mv, subv, cent_dtype, key))
        self.copies, self.value_sel = lay["NCOPY"], lay["SEL"]
        self.smem = lay.pop("_smem")
        if self.smem > SMEM_LIMIT:
            raise ValueError(f"the kernel with {self.copies} copies of the value table needs {self.smem} bytes of "
                             f"shared memory (at most {SMEM_LIMIT})")
        lay.pop("_reduce")
        lay.pop("_reduce_room")
        self.nt = lay["NT"]
        # CTAs per SM-slot to aim for (cuda_splits): measured best at 2 (each CTA first fills up to 205 KB of
        # tables; NOTES.md "Coded decode, CUDA C++ (post-RoPE LUT)")
        self.waves = 2.0
        self.ctas_per_sm = lay["MINB"]
        self.kernel = load_kernel(_source(), "antkv_coded_warp", device, lay, self.smem)

    def __call__(self, pairs: int, p_coded: int, cent_k, qc, codes_k, codes_v, bits, n_coded, cent_v, po, pl, cnt,
                 hkv: int, n_cap: int, nw: int, ps: int, cbv_per_head: int, rv: int, hcb_k: int = 1,
                 cbk_per_head: int = 0, value_sel=None) -> None:
        """``cent_k``: the key centroids [stages, H_cb, SK, MK, SUBK] (the kernel builds the key lookup table);
        ``value_sel``: the value-copy selection words ([pairs, n_cap] int16, value_copies.py) or None."""
        args = [cent_k, qc, codes_k, codes_v, bits, n_coded, cent_v, po, pl, cnt, hkv, n_cap, nw, p_coded, ps,
                cbv_per_head, rv, hcb_k, cbk_per_head, value_sel]
        self.kernel((pairs, p_coded, 1), self.nt, self.smem, args)


__all__ = ["CodedDecodeCuda", "coded_decode_kernel", "cuda_splits", "shape_reason", "unsupported_reason",
           "selection_mode", "warp_layout"]
