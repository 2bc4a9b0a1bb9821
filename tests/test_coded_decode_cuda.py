"""The CUDA C++ coded-decode kernel's host side, on any machine: what it accepts, its shared-memory budget, its
split policy, that its source ships with the package and (where an NVRTC library is found) that it compiles.
Its numerics are tested against the reference on a GPU (tests/test_cuda.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import get_preset
from antkv_compile.kernels import coded_decode_cuda as CDC


def _case(bits="1", g=4, tq=1, cent_dtype=torch.float16, d=128, hkv=2, stages=None):
    p = get_preset(bits)
    s = d // p.sub_dim
    st_ = stages or p.stages
    q = torch.zeros(1, hkv * g, tq, d)
    codes = torch.zeros(1, hkv, 64, s * st_, dtype=torch.uint8)
    cent = torch.zeros(st_, hkv, s, p.num_centroids, p.sub_dim, dtype=cent_dtype)
    return q, codes, codes, cent, cent


@pytest.mark.parametrize("bits", ["1", "0.375"])
@pytest.mark.parametrize("cent_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_presets_are_supported_and_fit_shared_memory(bits, cent_dtype):
    q, ck, cv, cent_k, cent_v = _case(bits, cent_dtype=cent_dtype)
    assert CDC.shape_reason(q, ck, cv, cent_k, cent_v, 16) is None
    p = get_preset(bits)
    s = ck.shape[3]
    lay = CDC.warp_layout(s, p.num_centroids, s, p.num_centroids, p.sub_dim, cent_dtype, (s, p.sub_dim, cent_dtype))
    assert lay["_smem"] <= CDC.SMEM_LIMIT and lay["_reduce"] <= lay["_reduce_room"]


def test_refusals_name_the_reason():
    q, ck, cv, cent_k, cent_v = _case("1", g=8)  # 8 query rows per KV head
    assert "query rows" in CDC.shape_reason(q, ck, cv, cent_k, cent_v, 16)
    q, ck, cv, cent_k, cent_v = _case("1", g=2, tq=2)  # 2 x 2 = 4 rows: fine
    assert CDC.shape_reason(q, ck, cv, cent_k, cent_v, 16) is None
    # two-stage value codebook, 2 x 8 = 16 codes per token (at 1 bit, 32 codes would be refused first)
    q, ck, cv, cent_k, cent_v = _case("0.375", stages=2)
    assert "multi-stage" in CDC.shape_reason(q, ck, cv, cent_k, cent_v, 16)
    q, ck, cv, cent_k, cent_v = _case("1")
    assert CDC.unsupported_reason(q, ck, cv, cent_k, cent_v, 16) == "not a CUDA tensor"


def test_decode_plan_refuses_cuda_without_a_gpu():
    from antkv_compile.kernels import decode_attention as DA

    if torch.cuda.is_available() and not DA.interpreting():
        pytest.skip("a GPU is present: tests/test_cuda.py covers it")
    with pytest.raises(ValueError, match="coded must be"):
        DA.DecodePlan.__init__(object.__new__(DA.DecodePlan), *_plan_args(), coded="bogus")
    with pytest.raises((ValueError, RuntimeError), match="coded='cuda'|triton"):
        DA.DecodePlan(*_plan_args(), coded="cuda")


def _plan_args():
    b, hkv, g, d, n = 1, 2, 4, 128, 64
    p = get_preset("1")
    s = d // p.sub_dim
    z = torch.zeros
    cent = z(1, hkv, s, p.num_centroids, p.sub_dim)
    inv, mean = torch.eye(d).expand(hkv, d, d).contiguous(), z(hkv, d)
    return [z(b, hkv * g, 1, d), z(b, hkv, n, s, dtype=torch.uint8), z(b, hkv, n, s, dtype=torch.uint8),
            z(b, hkv, 2, dtype=torch.int32), z(b, dtype=torch.int32), z(b, hkv, 1, d), z(b, hkv, 1, d),
            torch.full((b, hkv, 1), -1, dtype=torch.int32), z(b, hkv, 8, d), z(b, hkv, 8, d), z(b, dtype=torch.int32),
            cent, inv, mean, cent, inv, mean, d ** -0.5]


@settings(max_examples=80, deadline=None)
@given(pairs=st.integers(1, 4096), capacity=st.integers(1, 1 << 23), sms=st.integers(1, 200),
       ctas=st.integers(1, 2), waves=st.sampled_from([0.25, 1.0, 4.0, 8.0]))
def test_split_policy_bounds(pairs, capacity, sms, ctas, waves):
    p = CDC.cuda_splits(pairs, capacity, sms, ctas, waves)
    assert 1 <= p <= 64
    assert p == 1 or -(-capacity // p) >= 1024 // 2  # chunks stay about 1024 tokens or longer
    if p < 64 and p * 1024 < capacity:  # not clamped: about `waves` waves of CTAs
        assert pairs * p >= waves * sms * ctas


def test_source_ships_with_the_package():
    src = CDC._source()
    assert 'extern "C" __global__' in src and "antkv_coded_warp" in src and "antkv_coded_partials" not in src


def _nvrtc_or_skip():
    from antkv_compile.kernels import cuda_rtc

    try:
        cuda_rtc.nvrtc()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no NVRTC library here ({exc}); the GPU tests compile it")
    return cuda_rtc


def _entry(ptx: str, name: str) -> str:
    """The PTX body of one kernel entry."""
    body = ptx.split(f".entry {name}")[1]
    return body.split(".entry ")[0]


@pytest.mark.parametrize("bits", ["1", "0.375"])
@pytest.mark.parametrize("cent_dtype", [torch.bfloat16, torch.float32])
def test_warp_kernel_compiles_to_ptx(bits, cent_dtype):
    """ldmatrix + tensor cores for every centroid dtype, as many table copies as fit (2 at 1 bit, 8 at
    0.375 bit), within the opt-in shared memory of one block; the key table read as 8-byte fp16 entries."""
    cuda_rtc = _nvrtc_or_skip()
    p = get_preset(bits)
    s = 128 // p.sub_dim
    lay = CDC.warp_layout(s, p.num_centroids, s, p.num_centroids, p.sub_dim, cent_dtype, (s, p.sub_dim, cent_dtype))
    assert lay["NCOPY"] == {"1": 2, "0.375": 8}[bits] and lay["_smem"] <= CDC.SMEM_LIMIT
    assert lay["_reduce"] <= lay["_reduce_room"]
    head = "".join(f"#define {k} {v}\n" for k, v in lay.items() if not k.startswith("_"))
    body = _entry(cuda_rtc.compile_ptx(head + CDC._source(), "antkv_coded_warp", "compute_90a").decode(),
                  "antkv_coded_warp")
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in body
    assert "mma.sync.aligned.m16n8k16.row.col.f32." + ("bf16" if cent_dtype == torch.bfloat16 else "f16") in body
    assert "cvt.rn.f16x2.f32" in body  # the fp16 table is packed in the kernel
    assert body.count("ld.shared.v2.u32") >= s  # and read as 8-byte entries, one per key sub-space


def test_fp16_key_table_halves_its_shared_memory():
    """v7: a code's fp16 row is 128 bytes (16 entries of 4 rows: 16 / CK copies of its CK sub-spaces); the fp32
    size is what shape_reason checks."""
    for bits in ("1", "0.375"):
        p = get_preset(bits)
        s = 128 // p.sub_dim
        args = (s, p.num_centroids, s, p.num_centroids, p.sub_dim, torch.float16, (s, p.sub_dim, torch.float16))
        full, half = CDC.warp_layout(*args, key_half=0), CDC.warp_layout(*args)
        assert full["_smem"] - half["_smem"] == s * p.num_centroids * 16 - p.num_centroids * 128


def test_value_selection_applies_at_two_copies_only():
    """v8: the selection mode (2) is a compile-time constant used where exactly 2 copies of the value table fit
    (1 bit): there the kernel loads one 2-byte word per token; elsewhere (0.375 bit: 8 copies) it loads none."""
    lays = {}
    for bits, copies in (("1", 2), ("0.375", 8)):
        p = get_preset(bits)
        s = 128 // p.sub_dim
        lay = lays[copies] = CDC.warp_layout(s, p.num_centroids, s, p.num_centroids, p.sub_dim, torch.float16,
                                             (s, p.sub_dim, torch.float16))
        assert lay["NCOPY"] == copies and lay["SEL"] == (2 if copies == 2 else 0)
        cent = torch.empty(1, 1, s, p.num_centroids, p.sub_dim, dtype=torch.float16, device="meta")
        assert CDC.selection_mode(cent, cent, s, s) == lay["SEL"]
    cuda_rtc = _nvrtc_or_skip()
    for copies, lay in lays.items():
        head = "".join(f"#define {k} {v}\n" for k, v in lay.items() if not k.startswith("_"))
        body = _entry(cuda_rtc.compile_ptx(head + CDC._source(), "antkv_coded_warp", "compute_90a").decode(),
                      "antkv_coded_warp")
        assert ("ld.global.nc.u16" in body or "ld.global.u16" in body) == (copies == 2)  # the words are read
