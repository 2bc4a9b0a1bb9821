"""The rewrite pass and its op: opcheck, plan policy, and a property test (rewritten vs original graph).

Property bound: anchor_ratio=1.0 makes the store exact, so the rewritten graph equals the original within
float32 reassociation (atol 1e-5) or bf16 rounding of the output (atol 2e-2, rtol 2e-2).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from antkv_compile.backend import antkv_backend
from antkv_compile.config import AnTKVConfig
from antkv_compile.passes import ops  # noqa: F401 (registers the op)
from antkv_compile.runtime.state import session_for


def test_opcheck_cache_attend():
    session = session_for(AnTKVConfig(anchor_ratio=0.5, window=4, seed=123))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 16, generator=gen)
    k = torch.randn(1, 2, 6, 16, generator=gen)
    v = torch.randn(1, 2, 6, 16, generator=gen)
    pos = torch.arange(6)
    mask = (torch.arange(12)[None, :] <= pos[:, None])[None, None]
    for m in (None, mask):
        torch.library.opcheck(torch.ops.antkv_rt.cache_attend.default, (q, k, v, pos, m, session.sid, 0, 12, 0.25))


def test_op_rejects_padding_mask():
    from antkv_compile.numerics.store import CacheInputError

    session = session_for(AnTKVConfig(window=4))
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    pos = torch.arange(3)
    mask = (torch.arange(8)[None, :] <= pos[:, None])[None, None].clone()
    mask[..., 0] = False  # a left-padded token
    with pytest.raises(CacheInputError, match="causal"):
        torch.ops.antkv_rt.cache_attend(q, k, k, pos, mask, session.sid, 0, 8, 0.3)


class StaticAttention(torch.nn.Module):
    """One attention layer with an HF-5.x-style static cache (arange + cumulative_length, add_, index_copy_,
    repeat_kv, bool causal mask, SDPA)."""

    def __init__(self, batch, hq, hkv, d, cap, dtype):
        super().__init__()
        self.hq, self.hkv = hq, hkv
        self.keys = torch.zeros(batch, hkv, cap, d, dtype=dtype)
        self.values = torch.zeros(batch, hkv, cap, d, dtype=dtype)
        self.cumulative_length = torch.zeros((), dtype=torch.int64)
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)

    def forward(self, q, k, v):
        t = k.shape[2]
        cache_position = torch.arange(t) + self.cumulative_length
        self.cumulative_length.add_(t)
        self.keys.index_copy_(2, cache_position, k)
        self.values.index_copy_(2, cache_position, v)
        cap = self.keys.shape[2]
        mask = (torch.arange(cap)[None, :] <= cache_position[:, None])[None, None]
        n = self.hq // self.hkv
        b, h, s, d = self.keys.shape
        kk = self.keys[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        vv = self.values[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=d ** -0.5) * 2.0


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 2), d=st.sampled_from([8, 16]),
       prompt=st.integers(1, 7), steps=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_rewritten_equals_original(batch, hkv, groups, d, prompt, steps, dtype):
    hq, cap = hkv * groups, prompt + steps + 1
    gen = torch.Generator().manual_seed(batch * 100 + d + prompt)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    chunks = [(rand(batch, hq, t, d), rand(batch, hkv, t, d), rand(batch, hkv, t, d)) for t in [prompt] + [1] * steps]
    original = StaticAttention(batch, hq, hkv, d, cap, dtype)
    rewritten = StaticAttention(batch, hq, hkv, d, cap, dtype)
    torch._dynamo.reset()
    f = torch.compile(rewritten, backend=antkv_backend, options={"anchor_ratio": 1.0, "window": 2, "inner": "eager",
                                                                 "bits": "1" if d % 8 == 0 else "4"})
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for q, k, v in chunks:
            torch.testing.assert_close(f(q, k, v).float(), original(q, k, v).float(), **tol)
    from antkv_compile.backend import last_compiles

    assert last_compiles[-1]["plan"].rewrites
    assert rewritten.keys.untyped_storage().nbytes() <= 4  # released


def test_plan_falls_back_on_unsupported():
    import sys

    sys.path.insert(0, "tests")
    from graph_capture import capture_legacy45, capture_step, tiny_model
    from antkv_compile.passes import plan_rewrite
    from antkv_compile.patterns import find_attention_sites

    bad = capture_legacy45(read_before_write=True)
    plan = plan_rewrite(find_attention_sites(bad.gm))
    assert not plan.rewrites and "read_before_write" in plan.fallback_reason
    good = capture_legacy45()
    plan = plan_rewrite(find_attention_sites(good.gm))
    assert plan.rewrites and len(plan.sites) == 2
    eager = capture_step(tiny_model("gemma2", attn_implementation="eager"))  # logit soft-capping
    plan = plan_rewrite(find_attention_sites(eager.gm))
    assert not plan.rewrites


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 12), t=st.integers(1, 4), extra=st.integers(0, 5), flip=st.integers(-1, 40),
       additive=st.booleans(), rows_one=st.booleans())
def test_device_causal_flag_equals_mask_is_causal(start, t, extra, flip, additive, rows_one):
    """The sync-free check (_causal_flag, position read on the device) decides exactly as mask_is_causal."""
    from antkv_compile.passes.ops import _causal_flag, mask_is_causal

    length = start + t + extra
    q_pos = torch.arange(start, start + t)
    allowed = torch.arange(length)[None, :] <= q_pos[:, None]
    if rows_one:
        allowed = allowed[-1:]
    if 0 <= flip < allowed.numel():  # one entry changed: inside the held positions it breaks causality
        allowed.view(-1)[flip] ^= True
    mask = (torch.where(allowed, 0.0, float("-inf")) if additive else allowed)[None, None]
    if rows_one and t > 1:
        return  # decided on the host without the flag (a one-row mask cannot serve several queries)
    flag = _causal_flag(mask, torch.tensor([start]), t)
    assert bool(flag) == mask_is_causal(mask, start, t)


def test_step_facts_reads_the_device_once_per_forward(monkeypatch):
    """Later layers of one forward reuse the first layer's read; a lower layer index starts a new forward."""
    from antkv_compile.passes import ops as pops

    class S:
        check_mask = True
        _step_facts = None

    s, reads = S(), []
    real = pops._causal_flag
    monkeypatch.setattr(pops, "_causal_flag", lambda *a: reads.append(1) or real(*a))
    mask = (torch.arange(8)[None, :] <= torch.tensor([5])[:, None])[None, None]
    for layer in (0, 1, 2):
        assert pops.step_facts(s, layer, torch.tensor([5]), mask, 1) == (5, True)
    assert len(reads) == 1
    mask2 = (torch.arange(8)[None, :] <= torch.tensor([6])[:, None])[None, None]
    assert pops.step_facts(s, 0, torch.tensor([6]), mask2, 1) == (6, True)  # next forward: read again
    mask3 = (torch.arange(9)[None, :] <= torch.tensor([6, 7])[:, None])[None, None]
    assert pops.step_facts(s, 1, torch.tensor([6]), mask3, 2) == (6, True)  # two tokens now: read again
    assert len(reads) == 3
