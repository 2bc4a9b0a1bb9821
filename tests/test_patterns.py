"""Tests of ``antkv_compile.patterns`` on Dynamo graphs traced from real transformers models.

Models are 2-layer random-weight models built from transformers' config classes (``graph_capture``);
every catalogue entry is exercised on a traced graph: StaticCache ``index_copy_`` (transformers' own), the
``setitem`` fallback (transformers' ``StaticLayer`` with only ``update`` swapped for its fallback branch),
``DynamicCache`` ``torch.cat``, and the 4.5x ``cache_position``-input form, which uses a hand-written
module mimicking 4.5x (``graph_capture.Legacy45Model``; transformers 4.5x is not installed).
"""

from __future__ import annotations

import functools
import logging
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graph_capture as gc
from antkv_compile.patterns import (
    ATTENTION_ENTRIES,
    CACHE_WRITE_ENTRIES,
    Reason,
    find_attention_sites,
    match_attention,
    parse_cache_name,
    predicates as P,
)

SLIDING_FAMILIES = {"gemma3"}  # alternate sliding (layer 0) / global (layer 1) layers, window 8 < cache


@functools.lru_cache(maxsize=None)
def captured(family, impl="sdpa", step="decode", cache="static", **overrides):
    model = gc.tiny_model(family, attn_implementation=impl, **overrides)
    return gc.capture_step(model, step=step, cache=cache)


def attn_module(model, layer):
    return model.model.layers[layer].self_attn


def check_site(site, cap, *, impl, cache):
    """Field-by-field checks of one matched site against the model it came from."""
    cfg = cap.model.config
    attn = attn_module(cap.model, site.layer)
    a = site.attention
    assert site.scale == pytest.approx(attn.scaling)
    assert site.gqa_groups == cfg.num_attention_heads // cfg.num_key_value_heads
    assert a.num_heads == cfg.num_attention_heads and a.num_kv_heads == cfg.num_key_value_heads
    assert a.head_dim == attn.head_dim and a.q_len == cap.q_len
    assert a.dropout_p == 0.0 and a.softcap is None
    assert site.output is a.node and site.query is a.query
    # the cache tensors are graph inputs named after their layer
    for buf, role in ((site.key_buffer, "keys"), (site.value_buffer, "values")):
        assert buf.op == "placeholder"
        assert parse_cache_name(buf) is not None and parse_cache_name(buf).layer == site.layer
        assert parse_cache_name(buf).role == role
    # the new states are what the write node writes
    assert site.new_key in site.key_write.node.all_input_nodes
    assert site.new_value in site.value_write.node.all_input_nodes
    if cache == "static":
        assert site.cache_kind == "static" and site.key_write.pattern == "static_index_copy"
        assert site.key_write.position_source == "cumulative_length"
        assert site.position is site.value_write.position is not None
        upd = site.key_write.counter_update
        assert upd is not None and upd.target == "add_" and upd.args[1] == cap.q_len
        assert parse_cache_name(site.key_write.counter.name).role == "cumulative_length"
        assert a.mask is not None and a.mask.kind == ("bool" if impl == "sdpa" else "additive")
        if site.gqa_groups > 1:
            assert a.pattern == ("sdpa_repeat_kv" if impl == "sdpa" else "eager_repeat_kv")
    else:
        assert site.cache_kind == "dynamic" and site.key_write.pattern == "dynamic_cat"
        assert site.position is None and site.key_write.node is a.key_source
        if impl == "sdpa" and a.mask is None:  # 5.23: no mask needed -> HF passes enable_gqa=True
            assert a.pattern == "sdpa_gqa" and a.enable_gqa
        elif impl == "sdpa":  # 5.17 materialises the mask while compiling -> repeat_kv
            assert a.pattern == "sdpa_repeat_kv" and a.mask.kind == "bool"


# --------------------------------------------------------------------------------------------------
# every family: one site per layer, StaticCache decode and chunked prefill, sdpa and eager


# Each capture is a Dynamo trace (~1 s of CPU), so the matrix is trimmed: sdpa decode for every family, eager
# decode for four (qwen2/qwen3 share llama's ``eager_attention_forward``); the chunked-prefill graph differs
# from decode only in q_len and mask rows (same ops, same order), so it is covered for four families with
# sdpa and for llama with eager (test_llama_shapes adds random q_len).
STATIC_CASES = [(f, "sdpa", "decode") for f in gc.FAMILIES] + \
    [(f, "eager", "decode") for f in ("llama", "mistral", "gemma3", "phi3")] + \
    [(f, "sdpa", "prefill") for f in ("llama", "qwen3", "gemma3", "phi3")] + [("llama", "eager", "prefill")]


@pytest.mark.parametrize("family, impl, step", STATIC_CASES)
def test_static_cache_one_site_per_layer(family, impl, step):
    cap = captured(family, impl, step)
    report = find_attention_sites(cap.gm, name=f"{family}/{impl}/{step}")
    n_layers = cap.model.config.num_hidden_layers
    if family in SLIDING_FAMILIES:
        assert report.layers == (1,)
        (u,) = report.unsupported
        assert (u.reason, u.layer) == (Reason.SLIDING_WINDOW, 0), report.summary()
    else:
        assert report.layers == tuple(range(n_layers)), report.summary()
        assert report.fully_matched, report.summary()
    for site in report:
        check_site(site, cap, impl=impl, cache="static")
    if family == "mistral":  # window 4096 > 32-slot cache: recorded, inactive, matched
        assert all(s.sliding_window == 4096 for s in report)


# (mistral's dynamic cache truncates to its window: test_mistral_dynamic_cache_with_window_is_unsupported)
DYNAMIC_CASES = [(f, "sdpa") for f in ("llama", "gemma3", "phi3")] + [("llama", "eager")]


@pytest.mark.parametrize("family, impl", DYNAMIC_CASES)
def test_dynamic_cache_cat(family, impl):
    cap = captured(family, impl, "decode", "dynamic")
    report = find_attention_sites(cap.gm)
    if family in SLIDING_FAMILIES:
        assert report.layers == (1,)
        assert [(u.reason, u.layer) for u in report.unsupported] == [(Reason.SLIDING_WINDOW, 0)]
    else:
        assert report.layers == (0, 1) and report.fully_matched, report.summary()
    for site in report:
        check_site(site, cap, impl=impl, cache="dynamic")


def test_mistral_dynamic_cache_with_window_is_unsupported():
    """DynamicSlidingWindowLayer stores ``cat[:, :, -W+1:]``: a cache that truncates is not one we model."""
    report = find_attention_sites(captured("mistral", "sdpa", "decode", "dynamic").gm)
    assert not report.sites
    assert [u.reason for u in report.unsupported] == [Reason.SLIDING_WINDOW] * 2
    assert "window 4096" in report.unsupported[0].detail  # 5.23: from cat[:, :, -4095:]; 5.17: from the mask


# --------------------------------------------------------------------------------------------------
# Gemma3: sliding layers reported, global layers matched, in every step form


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_sliding_reported_global_matched(impl):
    cap = captured("gemma3", impl, "decode")
    report = find_attention_sites(cap.gm)
    (site,) = report.sites
    (u,) = report.unsupported
    assert site.layer == 1 and site.sliding_window is None and site.attention.sliding_window is None
    assert u.layer == 0 and u.reason == Reason.SLIDING_WINDOW and "window 8" in u.detail
    sliding = match_attention(u.node)
    assert sliding is not None and sliding.sliding_window == 8
    text = str(report)
    assert "sliding_window" in text and "layer 1" in text and "1 attention site(s) matched, 1 unsupported" in text


def test_gemma3_full_sliding_window_roll_path():
    """Once the 8-slot sliding buffer is full, StaticSlidingWindowLayer rolls: ``roll`` + ``setitem`` on the
    copy + ``copy_`` back.  Still reported as sliding_window (with the unknown write in the detail)."""
    model = gc.tiny_model("gemma3")
    report = find_attention_sites(gc.capture_step(model, prompt_len=9).gm)
    assert report.layers == (1,)
    (u,) = report.unsupported
    assert u.reason == Reason.SLIDING_WINDOW and Reason.UNRECOGNISED_CACHE_WRITE in u.detail


# --------------------------------------------------------------------------------------------------
# the other catalogue entries


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_on_empty_static_cache(impl):
    """Compiled prefill with a lazily initialised cache: buffers are in-graph ``torch.zeros``.  With
    transformers 5.23 SDPA gets no mask, ``is_causal=True``, ``enable_gqa=True`` and K/V sliced to
    ``[:, :, :q_len]``; 5.17 keeps the bool mask and ``repeat_kv`` over the whole buffer."""
    cap = captured("llama", impl, "prefill_fresh")
    report = find_attention_sites(cap.gm)
    assert report.layers == (0, 1) and report.fully_matched, report.summary()
    for site in report:
        assert site.key_buffer.target is torch.zeros and site.value_buffer.target is torch.zeros
        assert site.key_write.pattern == "static_index_copy" and site.key_write.counter.target == "to"
        a = site.attention
        if impl == "sdpa" and a.mask is None:
            assert a.pattern == "sdpa_gqa" and a.is_causal and a.enable_gqa
            assert a.kv_limit == cap.q_len == a.kv_len
        elif impl == "sdpa":
            assert a.pattern == "sdpa_repeat_kv" and not a.is_causal and a.mask.kind == "bool"
            assert a.kv_limit is None and a.kv_len == 32
        else:
            assert a.pattern == "eager_repeat_kv" and not a.is_causal and a.mask.kind == "additive"


def test_setitem_fallback_write():
    model = gc.tiny_model("llama")
    cap = gc.capture_with_cache(model, gc.make_setitem_cache(model))
    report = find_attention_sites(cap.gm)
    assert report.layers == (0, 1) and report.fully_matched, report.summary()
    for site in report:
        assert site.key_write.pattern == site.value_write.pattern == "setitem_write"
        assert site.key_write.node.target is operator.setitem
        assert site.key_write.position_source == "cumulative_length"
        assert site.key_write.counter_update is not None


def test_legacy45_cache_position_input():
    cap = gc.capture_legacy45()
    report = find_attention_sites(cap.gm)
    assert report.layers == (0, 1) and report.fully_matched, report.summary()
    for site in report:
        assert site.key_write.pattern == "input_position_index_copy"
        assert site.position.op == "placeholder" and "cache_position" in site.position.name
        assert site.key_write.counter is None
        assert site.key_buffer.name == f"l_past_key_values_layers_{site.layer}_keys"
        mask = site.attention.mask
        assert mask.source.op == "placeholder" and mask.node is not mask.source  # m[:, :, :, :L]
        assert mask.shape[-1] == site.attention.kv_len == 16


def test_read_before_write_is_reported():
    report = find_attention_sites(gc.capture_legacy45(read_before_write=True).gm)
    assert not report.sites
    assert [u.reason for u in report.unsupported] == [Reason.READ_BEFORE_WRITE] * 2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mha_without_gqa(impl):
    report = find_attention_sites(captured("llama", impl, kv_heads=4).gm)
    assert report.layers == (0, 1)
    assert {s.attention.pattern for s in report} == {"sdpa_mha" if impl == "sdpa" else "eager"}
    assert {s.gqa_groups for s in report} == {1}


# --------------------------------------------------------------------------------------------------
# unsupported shapes are reported, never silently matched


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dropout_in_training_mode(impl):
    model = gc.tiny_model("llama", attn_implementation=impl, attention_dropout=0.1).train()
    report = find_attention_sites(gc.capture_step(model).gm)
    assert not report.sites
    assert [u.reason for u in report.unsupported] == [Reason.DROPOUT] * 2
    assert all("0.1" in u.detail for u in report.unsupported)


def test_softcapping_gemma2_eager():
    report = find_attention_sites(captured("gemma2", "eager").gm)
    assert not report.sites
    assert [(u.layer, u.reason) for u in report.unsupported] == [(0, Reason.SLIDING_WINDOW), (1, Reason.SOFTCAP)]
    assert Reason.SOFTCAP in report.unsupported[0].detail  # secondary reasons are kept


def test_no_cache_kv():
    model = gc.tiny_model("llama")
    gm = gc.capture_module(model, input_ids=torch.randint(1, 100, (1, 4)), use_cache=False)
    report = find_attention_sites(gm)
    assert not report.sites
    assert [u.reason for u in report.unsupported] == [Reason.NON_CACHE_KV] * 2


def test_model_without_attention_gives_empty_report():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.Softmax(-1))
    report = find_attention_sites(gc.capture_module(mlp, torch.randn(2, 8)), name="mlp")
    assert not report.sites and not report.unsupported and report.fully_matched
    assert str(report) == "mlp: 0 attention site(s) matched, 0 unsupported"


def test_orphan_cache_write_and_unknown_softmax():
    class M(torch.nn.Module):
        def forward(self, past_key_values_layers_0_keys, k, pos, q):
            past_key_values_layers_0_keys.index_copy_(2, pos, k)  # written, never attended
            w = torch.matmul(q, q.transpose(-1, -2))
            p = torch.softmax(w.sigmoid(), dim=-1)  # sigmoid: no catalogue entry
            return torch.matmul(p, q)

    gm = gc.capture_module(M(), torch.zeros(1, 2, 8, 4), torch.randn(1, 2, 1, 4), torch.tensor([3]),
                           torch.randn(1, 2, 3, 4))
    report = find_attention_sites(gm)
    assert sorted(u.reason for u in report.unsupported) == [Reason.ORPHAN_CACHE_WRITE]
    # softmax(sigmoid(matmul)) does not "look like" attention scores -> not reported; a mul by a tensor is
    class N(torch.nn.Module):
        def forward(self, q, t):
            return torch.matmul(torch.softmax(torch.matmul(q, q.transpose(-1, -2)) * t, dim=-1), q)

    report = find_attention_sites(gc.capture_module(N(), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 3)))
    assert [u.reason for u in report.unsupported] == [Reason.UNKNOWN_ATTENTION_FORM]


def test_logging_and_summary(caplog):
    with caplog.at_level(logging.DEBUG, logger="antkv_compile.patterns"):
        report = find_attention_sites(captured("gemma3", "sdpa").gm, name="g3")
    assert any(r.name == "antkv_compile.patterns" for r in caplog.records)
    lines = report.summary().splitlines()
    assert lines[0] == "g3: 1 attention site(s) matched, 1 unsupported"
    assert lines[1].startswith("  + layer 1: sdpa_repeat_kv <- static_index_copy")
    assert lines[2].startswith("  - layer 0: attn_output [sliding_window]")


# --------------------------------------------------------------------------------------------------
# hypothesis: shapes of real models, spellings of hand-written ones

_SLOW = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
             phases=[Phase.explicit, Phase.generate])  # no shrinking: every example is a compile


@settings(max_examples=3, **_SLOW)
@given(
    kv_heads=st.sampled_from([1, 2, 4]),
    rep=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16, 32]),
    q_len=st.integers(1, 4),
    impl=st.sampled_from(["sdpa", "eager"]),
)
def test_llama_shapes(kv_heads, rep, head_dim, q_len, impl):
    heads = kv_heads * rep
    model = gc.tiny_model("llama", attn_implementation=impl, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          hidden=heads * head_dim)
    cap = gc.capture_step(model, step="decode" if q_len == 1 else "prefill", q_len=q_len)
    report = find_attention_sites(cap.gm)
    assert report.layers == (0, 1) and report.fully_matched, report.summary()
    for site in report:
        check_site(site, cap, impl=impl, cache="static")
        expected = {("sdpa", True): "sdpa_repeat_kv", ("sdpa", False): "sdpa_mha",
                    ("eager", True): "eager_repeat_kv", ("eager", False): "eager"}[impl, rep > 1]
        assert site.attention.pattern == expected
        assert site.attention.kv_len == 32


class _Spelled(torch.nn.Module):
    """A hand-written cache + attention, its ops spelled one of several equivalent ways."""

    def __init__(self, write, gqa, eager, with_mask):
        super().__init__()
        self.write, self.gqa, self.eager, self.with_mask = write, gqa, eager, with_mask
        self.register_buffer("past_key_values_layers_0_keys", torch.zeros(1, 2, 8, 4))
        self.register_buffer("past_key_values_layers_0_values", torch.zeros(1, 2, 8, 4))

    def _write(self, buf, new, pos):
        if self.write == "method":
            buf.index_copy_(2, pos, new)
        elif self.write == "tensor_fn":
            torch.Tensor.index_copy_(buf, 2, pos, new)
        else:
            buf[:, :, pos] = new

    def _rep(self, x):
        if self.gqa == "getitem":
            return x[:, :, None, :, :].expand(1, 2, 2, 8, 4).reshape(1, 4, 8, 4)
        if self.gqa == "unsqueeze_view":
            return x.unsqueeze(2).expand(1, 2, 2, 8, 4).contiguous().view(1, 4, 8, 4)
        if self.gqa == "interleave":
            return torch.repeat_interleave(x, 2, dim=1)
        return x  # "enable_gqa"

    def forward(self, q, k, v, pos, mask):
        kc, vc = self.past_key_values_layers_0_keys, self.past_key_values_layers_0_values
        self._write(kc, k, pos)
        self._write(vc, v, pos)
        kk, vv = self._rep(kc), self._rep(vc)
        if self.eager:
            w = (q @ kk.transpose(-2, -1)) / 2.0
            if self.with_mask:
                w = w + mask
            return torch.matmul(w.softmax(-1), vv)
        gqa = {"enable_gqa": True} if self.gqa == "enable_gqa" else {}
        return torch.nn.functional.scaled_dot_product_attention(
            q, kk, vv, attn_mask=mask if self.with_mask else None, **gqa)


@settings(max_examples=12, **_SLOW)
@given(
    write=st.sampled_from(["method", "tensor_fn", "setitem"]),
    gqa=st.sampled_from(["getitem", "unsqueeze_view", "interleave", "enable_gqa"]),
    eager=st.booleans(),
    with_mask=st.booleans(),
)
def test_spellings(write, gqa, eager, with_mask):
    if eager and gqa == "enable_gqa":
        gqa = "getitem"
    module = _Spelled(write, gqa, eager, with_mask)
    mask = torch.zeros(1, 1, 1, 8) if eager else torch.ones(1, 1, 1, 8, dtype=torch.bool)
    gm = gc.capture_module(module, torch.randn(1, 4, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4),
                           torch.tensor([3]), mask)
    report = find_attention_sites(gm)
    (site,) = report.sites
    assert report.fully_matched, report.summary()
    assert site.layer == 0 and site.gqa_groups == 2
    assert site.key_write.pattern == ("setitem_write" if write == "setitem" else "input_position_index_copy")
    assert site.new_key.name == "l_k_" and site.new_value.name == "l_v_" and site.position.name == "l_pos_"
    assert (site.mask is not None) == with_mask
    assert site.scale == pytest.approx(0.5)
    assert site.attention.pattern.startswith("eager" if eager else "sdpa")


# --------------------------------------------------------------------------------------------------
# predicates and naming (no Dynamo)


def test_symbolic_trace_graph_without_metadata():
    """``fx.symbolic_trace``: buffers are ``get_attr`` nodes (one per access) and nodes carry no fake tensors."""
    gm = fx.symbolic_trace(_Spelled("method", "enable_gqa", eager=False, with_mask=False))
    (site,) = find_attention_sites(gm).sites
    assert site.key_buffer.op == "get_attr" and site.layer == 0
    assert site.key_buffer is not site.attention.key_source  # two accesses, one tensor
    assert site.gqa_groups is None and site.scale is None  # unknown without shapes


def _graph_with(*calls):
    g = fx.Graph()
    x = g.placeholder("x")
    nodes = [g.create_node(op, target, (x,) + tuple(args), {}) for op, target, args in calls]
    g.output(nodes[-1])
    return nodes


@pytest.mark.parametrize(
    "pred, spellings",
    [
        (P.is_sdpa, [("call_function", torch._C._nn.scaled_dot_product_attention, ()),
                     ("call_function", torch.nn.functional.scaled_dot_product_attention, ()),
                     ("call_function", torch.ops.aten.scaled_dot_product_attention.default, ())]),
        (P.is_index_copy_, [("call_method", "index_copy_", (2,)),
                            ("call_function", torch.Tensor.index_copy_, (2,)),
                            ("call_function", torch.ops.aten.index_copy_.default, (2,))]),
        (P.is_matmul, [("call_function", torch.matmul, ()), ("call_function", operator.matmul, ()),
                       ("call_method", "matmul", ())]),
        (P.is_softmax, [("call_function", torch.nn.functional.softmax, (-1,)), ("call_function", torch.softmax, (-1,)),
                        ("call_method", "softmax", (-1,))]),
        (P.is_setitem, [("call_function", operator.setitem, (0, 1))]),
        (P.is_cat, [("call_function", torch.cat, ()), ("call_function", torch.concat, ())]),
    ],
)
def test_predicates_accept_every_spelling(pred, spellings):
    for node in _graph_with(*spellings):
        assert pred(node), node.format_node()
    others = _graph_with(("call_method", "index_copy", (2,)), ("call_function", torch.index_copy, (2,)),
                         ("call_function", torch.add, (1,)))
    assert not any(pred(n) for n in others)
    assert not pred(None) and not pred(3)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("l_kwargs_past_key_values_layers_0_keys", (0, "keys")),
        ("l_args_3_layers_11_values", (11, "values")),
        ("L_past_key_values_layers_2_cumulative_length", (2, "cumulative_length")),
        ("l_past_key_values_key_cache_5_", (5, "keys")),
        ("l_self_modules_model_modules_layers_modules_0_modules_self_attn_modules_k_proj_parameters_weight_", None),
        ("l_kwargs_input_ids_", None),
    ],
)
def test_parse_cache_name(name, expected):
    parsed = parse_cache_name(name)
    assert (None if parsed is None else (parsed.layer, parsed.role)) == expected


def test_catalogue_entries_are_documented():
    for entry in CACHE_WRITE_ENTRIES + ATTENTION_ENTRIES:
        assert entry.doc, entry.name
    assert {e.name for e in CACHE_WRITE_ENTRIES} == {"static_index_copy", "input_position_index_copy",
                                                    "setitem_write", "dynamic_cat"}
