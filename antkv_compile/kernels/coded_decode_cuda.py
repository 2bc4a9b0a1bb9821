"""Launcher of the CUDA C++ coded-decode kernel (``coded_decode.cu``), the ``coded="cuda"`` option of
:class:`~antkv_compile.kernels.decode_attention.DecodePlan`.

It replaces only the coded split programs of the Triton decode: the prologue is the Triton kernel's (same
buffers), the key lookup table is built by the v6 kernel itself (v5 reads the Triton ``_decode_lut_kernel``'s),
the CUDA kernel writes the coded partials into the same slots and counts its arrivals, and the Triton kernel
then runs the exact programs (anchors, window) whose last arrival merges all partials. Its reference is therefore the same as the Triton decode's
(:func:`~antkv_compile.kernels.decode_attention.decode_attention_reference`); tests/test_cuda.py checks it
on a GPU. Why CUDA here and not Triton: NOTES.md ("v5").
"""
from __future__ import annotations

import functools
import math
import os
from importlib import resources

import torch

from ._common import cdiv

_CT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SMEM_LIMIT = 227 * 1024  # Hopper / Ampere opt-in maximum per block


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return resources.files(__package__).joinpath("coded_decode.cu").read_text()


DEFAULT_DB = int(os.environ.get("ANTKV_CUDA_DB", "0"))  # double-buffered tiles (NOTES.md v5), off until measured
# values on tensor cores (16-bit centroids): measured (NOTES.md v5) 5 % faster at 0.375 bit (16-dim sub-spaces) and
# 9 % slower at 1 bit (8-dim), so "auto" = only where the sub-space is 16 dimensions; ANTKV_CUDA_MMA=0/1 forces it
DEFAULT_MMA = os.environ.get("ANTKV_CUDA_MMA", "auto")
# which kernel of coded_decode.cu: "warp" (v6: per-warp loops, ldmatrix + tensor cores, copies of the value table)
# or "block" (v5: CTA-wide blocks of 512 tokens); NOTES.md "v6" has the measurements
DEFAULT_KERNEL = os.environ.get("ANTKV_CUDA_KERNEL", "warp")
KERNELS = {"warp": "antkv_coded_warp", "block": "antkv_coded_partials"}
# the v6 kernel's key lookup table in fp16 (1) or fp32 (0): fp16 halves the table's shared-memory traffic; its
# rounding (2^-12 relative per entry, summed in fp32) is measured in NOTES.md "v7"
DEFAULT_KEY_HALF = int(os.environ.get("ANTKV_CUDA_KEY_HALF", "1"))
# v8: value-copy selection words (value_copies.py) where the v6 kernel keeps 2 copies of the value table (1 bit):
# 0 off (row i reads copy i % 2, v7), 1 copies hashed by different code bits, 2 copy 1 = copy 0 shifted by 4 bank
# groups (NOTES.md "v8" has the measurements)
DEFAULT_VALUE_SEL = int(os.environ.get("ANTKV_CUDA_VALUE_SEL", "2"))


@functools.lru_cache(maxsize=None)
def layout(ck: int, mk: int, cv: int, mv: int, subv: int, cent_dtype: torch.dtype, db: int = 0,
           mma: int = 0) -> dict[str, int]:
    """Compile-time constants and the dynamic shared memory of one configuration."""
    esize = torch.empty((), dtype=cent_dtype).element_size()
    tables = ck * mk * 16 + cv * mv * subv * esize
    nt = 512 if tables > 96 * 1024 else 256  # one CTA per SM at 1 bit (128 KB of tables): 16 warps
    minb = 1 if nt == 512 else 2
    nwarp = nt // 32
    nbuf = 2 if db else 1
    smem = tables + nbuf * (nt * 16 + nt * cv + nwarp * 16)
    return {"CK": ck, "MK": mk, "CV": cv, "MV": mv, "SUBV": subv, "NT": nt, "MINB": minb, "CT": _CT[cent_dtype],
            "RPAD": 16, "DB": int(bool(db)), "MMA": int(bool(mma) and _CT[cent_dtype] < 2 and subv in (8, 16)),
            "_smem": smem, "_reduce": nwarp * 4 * cv * subv * 4,
            "_reduce_room": smem - nbuf * nwarp * 16}


@functools.lru_cache(maxsize=None)
def warp_layout(ck: int, mk: int, cv: int, mv: int, subv: int, cent_dtype: torch.dtype,
                copies: int | None = None, key: tuple[int, int, torch.dtype] = (16, 8, torch.float16),
                key_half: int = 0, value_sel: int = 0) -> dict[str, int]:
    """Constants and shared memory of the v6 kernel (``antkv_coded_warp``): 16 warps, one CTA per SM, the value
    table stored as 16-bit in ``copies`` copies (default: as many of 1, 2, 4, 8 as fit). ``key`` = (sub-spaces
    per stage, their dimension, dtype) of the key centroids, from which the kernel builds its lookup table,
    in fp16 (``key_half``: 128 bytes per code) or fp32 (16 bytes per code and sub-space); ``value_sel``: the mode of
    the value-copy selection words (value_copies.py), used only at 2 copies."""
    nt, nwarp = 512, 16
    lut = mk * 128 if key_half else ck * mk * 16
    table = cv * mv * subv * 2
    tiles = nwarp * (4 * 32 * 2 + 32 * cv) + 2 * nwarp * 16
    fits = [c for c in (1, 2, 4, 8) if lut + c * table + tiles <= SMEM_LIMIT]
    ncopy = copies if copies is not None else (fits[-1] if fits else 1)
    smem = lut + ncopy * table + tiles
    return {"CK": ck, "MK": mk, "CV": cv, "MV": mv, "SUBV": subv, "NT": nt, "MINB": 1, "CT": _CT[cent_dtype],
            "RPAD": 16, "NCOPY": ncopy, "SK": key[0], "SUBK": key[1], "CTK": _CT[key[2]], "KH": int(bool(key_half)),
            "SEL": int(value_sel) if ncopy == 2 else 0,
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
    if DEFAULT_KERNEL == "warp":
        if sub_v not in (8, 16):
            return f"value sub-spaces of {sub_v} dimensions (the tensor-core kernel takes 8 or 16)"
        sub_k = cent_k.shape[4]
        if cent_k.dtype not in _CT or (sub_k * cent_k.element_size()) % 16 or s_k * sub_k != d:
            return f"key sub-spaces of {sub_k} x {cent_k.dtype} (needs whole 16-byte rows, {s_k} x {sub_k} = {d})"
        lay = warp_layout(ck, m_k, cv, m_v, sub_v, cent_v.dtype, None, (s_k, sub_k, cent_k.dtype))
    else:
        lay = layout(ck, m_k, cv, m_v, sub_v, cent_v.dtype)
    if lay["_smem"] > SMEM_LIMIT or lay["_reduce"] > lay["_reduce_room"]:
        return f"{lay['_smem']} bytes of shared memory"
    return None


def selection_mode(cent_k: torch.Tensor, cent_v: torch.Tensor, codes_k: int, codes_v: int,
                   key_half: int | None = None, value_sel: int | None = None) -> int:
    """The value-copy selection mode (value_copies.py) the default CUDA kernel uses for these codebooks: 0 (none:
    it keeps 1, 4 or 8 copies of the value table, or would not run them), 1 or 2. Shapes only: no device, no
    compile."""
    st_k, _, s_k, m_k, sub_k = cent_k.shape
    _, _, _, m_v, sub_v = cent_v.shape
    if DEFAULT_KERNEL != "warp" or sub_v not in (8, 16) or codes_k not in (8, 16) or codes_v not in (8, 16):
        return 0
    if m_k > 256 or m_v > 256 or cent_v.dtype not in _CT or cent_k.dtype not in _CT:
        return 0
    kh = DEFAULT_KEY_HALF if key_half is None else key_half
    mode = DEFAULT_VALUE_SEL if value_sel is None else value_sel
    lay = warp_layout(codes_k, m_k, codes_v, m_v, sub_v, cent_v.dtype, None, (s_k, sub_k, cent_k.dtype), kh, mode)
    return lay["SEL"] if lay["_smem"] <= SMEM_LIMIT else 0


def cuda_splits(pairs: int, capacity: int, sms: int, ctas_per_sm: int, waves: float = 4.0) -> int:
    """Coded chunks per (sequence, KV head): about ``waves`` waves of CTAs (the tail of a partial wave costs
    little at four), chunks of at least 1024 tokens (each CTA first loads its two tables, up to 128 KB)."""
    p = cdiv(math.ceil(waves * sms * ctas_per_sm), max(1, pairs))
    return max(1, min(p, 64, cdiv(max(capacity, 1), 1024)))


@functools.lru_cache(maxsize=None)
def coded_decode_kernel(device: torch.device, ck: int, mk: int, cv: int, mv: int, subv: int, cent_dtype: torch.dtype,
                        db: int | None = None, mma: int | None = None, kernel: str | None = None,
                        copies: int | None = None, key: tuple[int, int, torch.dtype] = (16, 8, torch.float16),
                        key_half: int | None = None, value_sel: int | None = None) -> "CodedDecodeCuda":
    """One compiled kernel object per configuration and process (decode builds a plan every call)."""
    return CodedDecodeCuda(device, ck, mk, cv, mv, subv, cent_dtype, db, mma, kernel, copies, key, key_half,
                           value_sel)


class CodedDecodeCuda:
    """Compiled kernel + launch geometry for one (codebook shape, centroid dtype, device)."""

    def __init__(self, device: torch.device, ck: int, mk: int, cv: int, mv: int, subv: int,
                 cent_dtype: torch.dtype, db: int | None = None, mma: int | None = None, kernel: str | None = None,
                 copies: int | None = None, key: tuple[int, int, torch.dtype] = (16, 8, torch.float16),
                 key_half: int | None = None, value_sel: int | None = None):
        from .cuda_rtc import load_kernel

        self.kind = DEFAULT_KERNEL if kernel is None else kernel
        if self.kind not in KERNELS:
            raise ValueError(f"cuda kernel must be one of {sorted(KERNELS)} (got {self.kind!r})")
        self.key_half = self.value_sel = 0
        if self.kind == "warp":
            self.key_half = int(DEFAULT_KEY_HALF if key_half is None else key_half)
            sel = int(DEFAULT_VALUE_SEL if value_sel is None else value_sel)
            if sel not in (0, 1, 2):
                raise ValueError(f"value_sel must be 0, 1 or 2 (got {sel})")
            lay = dict(warp_layout(ck, mk, cv, mv, subv, cent_dtype, copies, key, self.key_half, sel))
            self.mma, self.copies, self.value_sel = 1, lay["NCOPY"], lay["SEL"]
        else:
            if mma is None:
                mma = int(subv == 16) if DEFAULT_MMA == "auto" else int(DEFAULT_MMA)
            lay = dict(layout(ck, mk, cv, mv, subv, cent_dtype, DEFAULT_DB if db is None else db, mma))
            self.mma, self.copies = lay["MMA"], 1
        self.smem = lay.pop("_smem")
        if self.smem > SMEM_LIMIT:
            raise ValueError(f"{self.kind} kernel with {self.copies} copies of the value table needs {self.smem} bytes "
                             f"of shared memory (at most {SMEM_LIMIT}); use fewer copies")
        lay.pop("_reduce")
        lay.pop("_reduce_room")
        self.nt = lay["NT"]
        # CTAs per SM-slot to aim for (cuda_splits): measured best at 2 for the per-warp kernel, whose CTAs each
        # first fill up to 205 KB of tables (kernels_bench_decode_20261122-120245: "cuda_m0.5"), 4 for v5
        self.waves = 2.0 if self.kind == "warp" else 4.0
        self.ctas_per_sm = lay["MINB"]
        self.kernel = load_kernel(_source(), KERNELS[self.kind], device, lay, self.smem)

    @property
    def builds_lut(self) -> bool:
        """The v6 kernel computes the key lookup table itself (from the key centroids and q'); v5 reads the one
        the Triton ``_decode_lut_kernel`` wrote."""
        return self.kind == "warp"

    def __call__(self, pairs: int, p_coded: int, lut_or_cent_k, qc, codes_k, codes_v, bits, n_coded, cent_v, po,
                 pl, cnt, hkv: int, n_cap: int, nw: int, ps: int, cbv_per_head: int, rv: int, hcb_k: int = 1,
                 cbk_per_head: int = 0, value_sel=None) -> None:
        """``lut_or_cent_k``: the key centroids [stages, H_cb, SK, MK, SUBK] for v6, the lookup table for v5;
        ``value_sel``: the v6 kernel's value-copy selection words ([pairs, n_cap] int16, value_copies.py) or None."""
        args = [lut_or_cent_k, qc, codes_k, codes_v, bits, n_coded, cent_v, po, pl, cnt,
                hkv, n_cap, nw, p_coded, ps, cbv_per_head, rv]
        if self.builds_lut:
            args += [hcb_k, cbk_per_head, value_sel]
        self.kernel((pairs, p_coded, 1), self.nt, self.smem, args)


__all__ = ["CodedDecodeCuda", "coded_decode_kernel", "cuda_splits", "layout", "shape_reason", "unsupported_reason",
           "selection_mode", "warp_layout"]
