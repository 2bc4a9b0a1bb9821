"""The dense split-K decode kernel (the full-precision baseline) against its reference (CPU: Triton interpreter),
its custom op, and the ``antkv_dense_decode`` attention function inside ``generate`` with a static cache.

Without CUDA, TRITON_INTERPRET=1 is set here before the kernel modules are imported. Small shapes: the whole
file runs in well under a minute on 2 cores (the compiled generate is most of it).
"""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEV, needs_triton  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from antkv_compile.kernels import dense_decode as DD  # noqa: E402


HYP = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b, hkv, g, tq, d, cap, dtype, seed, lengths=None):
    q = torch.randn(b, hkv * g, tq, d, generator=_gen(seed)).to(dtype).to(DEV)
    k = torch.randn(b, hkv, cap, d, generator=_gen(seed + 1)).to(dtype).to(DEV)
    v = torch.randn(b, hkv, cap, d, generator=_gen(seed + 2)).to(dtype).to(DEV)
    if lengths is None:
        lengths = torch.randint(tq, cap + 1, (b,), generator=_gen(seed + 3))
    return q, k, v, torch.as_tensor(lengths, dtype=torch.int32).to(DEV), d ** -0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    if not finite.any():
        return 0.0
    return float((a[finite] - b[finite]).norm() / b[finite].norm().clamp_min(1e-30))


def _run_poisoned(args, **options):
    q = args[0]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    DD.dense_decode_triton(*args, out=(out, lse), poison=True, **options)
    return out, lse


# ---------------------------------------------------------------------------------------------- kernel
@needs_triton
@HYP
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]), tq=st.sampled_from([1, 2, 3]),
       d=st.sampled_from([16, 32]), cap=st.sampled_from([1, 37, 130]), dtype=st.sampled_from([torch.float32, torch.float16]),
       splits=st.sampled_from([None, 1, 3, 8]), block_n=st.sampled_from([16, 32]), seed=st.integers(0, 99))
def test_dense_decode_matches_reference(b, hkv, g, tq, d, cap, dtype, splits, block_n, seed):
    tq = min(tq, cap)
    args = _inputs(b, hkv, g, tq, d, cap, dtype, seed)
    out, lse = _run_poisoned(args, splits=splits, block_n=block_n)
    ref_out, ref_lse = DD.dense_decode_reference(*args)
    assert not out.isnan().any() and not lse.isnan().any()
    assert _rel(out, ref_out) < 2 * TOL[dtype] and _rel(lse, ref_lse) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("splits", [1, 4])
def test_dense_decode_edge_lengths(splits):
    """Empty sequence, fewer valid positions than new tokens (early rows see nothing), one over the capacity
    (clamped), one exactly full: rows that see nothing give out 0 and lse -inf."""
    args = _inputs(4, 2, 2, 2, 16, 50, torch.float32, 7, lengths=[0, 1, 77, 50])
    out, lse = _run_poisoned(args, splits=splits, block_n=16)
    ref_out, ref_lse = DD.dense_decode_reference(*args)
    assert torch.isinf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isinf(lse[1, :, 0]).all() and torch.isfinite(lse[1, :, 1]).all()
    assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-5


@needs_triton
def test_dense_decode_strided_query_and_cache_views():
    """q as transformers hands it over (a transpose of [B, T, Hq, D]); caches as slices of a larger buffer."""
    b, hkv, g, tq, d, cap = 2, 2, 4, 2, 32, 40
    q_btd = torch.randn(b, tq, hkv * g, d, generator=_gen(1)).to(DEV)
    q = q_btd.transpose(1, 2)
    big_k = torch.randn(b, hkv + 1, cap, d, generator=_gen(2)).to(DEV)
    big_v = torch.randn(b, hkv + 1, cap, d, generator=_gen(3)).to(DEV)
    k, v = big_k[:, 1:], big_v[:, 1:]
    lengths = torch.tensor([33, 40], dtype=torch.int32, device=DEV)
    out, lse = _run_poisoned((q, k, v, lengths, 0.3), splits=3, block_n=16)
    ref_out, ref_lse = DD.dense_decode_reference(q.contiguous(), k.contiguous(), v.contiguous(), lengths, 0.3)
    assert _rel(out, ref_out) < 2e-5 and _rel(lse, ref_lse) < 2e-5


def test_default_splits_and_stages_h100_policy():
    """The policy measured on the H100 (132 SMs, Hkv = 8, NOTES.md): ~1 program per SM for B <= 2, ~2 per SM
    below one program per (sequence, KV head) per SM, then one split; 3-deep prefetch while <= 2 programs/SM."""
    sms = 132
    got = {b: DD.default_splits(b, 8, 32768, sms) for b in (1, 2, 4, 8, 16, 32, 64)}
    assert got == {1: 17, 2: 9, 4: 9, 8: 5, 16: 3, 32: 1, 64: 1}
    assert {b: DD.default_stages(b * 8 * p, sms) for b, p in got.items()} == {1: 3, 2: 3, 4: 2, 8: 2, 16: 2, 32: 3, 64: 2}
    assert DD.default_splits(1, 8, 8192, sms) == 16  # no split shorter than MIN_SPLIT_TOKENS
    assert DD.default_splits(1, 8, 100, sms) == 1


# ---------------------------------------------------------------------------------------------- op
def test_dense_decode_op_opcheck():
    from antkv_compile.kernels import ops

    for dtype in (torch.float32, torch.float16):
        args = _inputs(2, 2, 2, 2, 16, 24, dtype, 3, lengths=[24, 9])
        torch.library.opcheck(ops.OPS["dense_decode_attention"], args)
    out, lse = torch.ops.antkv.dense_decode_attention(*args)
    ref_out, ref_lse = DD.dense_decode_reference(*args)
    assert _rel(out, ref_out) < 2 * TOL[torch.float16] and _rel(lse, ref_lse) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------- model
def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0, **kw)


def test_attention_function_generate_static_cache_eager_and_compiled():
    """Tiny llama (G = 2): same greedy tokens as the stock "sdpa" implementation, uncompiled and with the decode
    step compiled by Inductor (generate's own compile path, CPU allowed). Prompt 40 tokens: the prefill (G*T = 80
    rows) goes through SDPA, the decode steps through the op; a prompt of 6 tokens runs the prefill through the op
    too (G*T = 12 <= 64)."""
    from transformers.generation.configuration_utils import CompileConfig

    from antkv_compile import baselines
    from antkv_compile.models import tiny_model

    model = tiny_model("llama", num_hidden_layers=1)
    ids_long = torch.randint(4, 100, (2, 40), generator=_gen(0))
    ids_short = torch.randint(4, 100, (2, 6), generator=_gen(1))
    ref_long, ref_short = _generate(model, ids_long), _generate(model, ids_short)
    graphs = []

    def inductor(gm, example_inputs):  # default Inductor, keeping the graphs it was given
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    model.set_attn_implementation(baselines.NAME)
    try:
        assert torch.equal(_generate(model, ids_long), ref_long)
        assert torch.equal(_generate(model, ids_short), ref_short)
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=inductor, mode=None)
        cc._compile_all_devices = True
        torch._dynamo.reset()
        assert torch.equal(_generate(model, ids_long, compile_config=cc), ref_long)
    finally:
        model.set_attn_implementation("sdpa")
        torch._dynamo.reset()
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert graphs and any("dense_decode_attention" in t for t in targets), "the compiled decode step does not call the op"
    assert not any("scaled_dot_product" in t for t in targets)
