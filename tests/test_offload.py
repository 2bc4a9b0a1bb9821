"""The retrieval mode through the stores and the product path: the kernel store with retrieval equals the retrieval
reference store (CPU: the antkv ops run their references), the host copy holds every coded token exactly, and
``model.compile(backend="antkv", options={"offload": "host", ...})`` + generate runs it."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import AnTKVConfig
from antkv_compile.numerics.retrieval import RetrievalLayerStore
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
from antkv_compile.runtime.host_kv import PinnedHostKV
from antkv_compile.runtime.offload_store import OffloadKernelStore
from numerics_helpers import codebook_with_transform, randn

D, H = 16, 2


def _pair(batch, capacity, **cfg):
    geom = StoreGeometry(batch, H, D, capacity, torch.float32, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(**{"bits": "1", "window": 8, "offload": "host", **cfg})
    cbk, cbv = codebook_with_transform("1", H, D, 1), codebook_with_transform("1", H, D, 2)
    return (RetrievalLayerStore(geom, cbk, cbv, config),
            OffloadKernelStore(geom, cbk, cbv, config, host=PinnedHostKV(geom)))


def _run(store, q, k, v, bounds):
    return torch.cat([store.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds], dim=2)


@settings(max_examples=6, deadline=None)
@given(prefill=st.integers(0, 40), n=st.integers(1, 60), batch=st.integers(1, 2), group=st.sampled_from([1, 3, 8]),
       ratio=st.sampled_from([0.0, 0.1]), fraction=st.sampled_from([0.0, 0.1, 0.5, 1.0]), floor=st.integers(0, 5),
       seed=st.integers(0, 999))
def test_kernel_store_with_retrieval_equals_the_reference(prefill, n, batch, group, ratio, fraction, floor, seed):
    prefill = min(prefill, n)
    ref, ker = _pair(batch, 80, anchor_ratio=ratio, retrieve_fraction=fraction, retrieve_min=floor)
    q = randn(batch, H * group, n, D, seed=seed)
    k, v = randn(batch, H, n, D, seed=seed + 1), randn(batch, H, n, D, seed=seed + 2)
    chunk = [(prefill, prefill + 5)] if n - prefill > 5 else []  # a multi-token step over the coded prefix
    start = prefill + 5 if chunk else prefill
    bounds = ([(0, prefill)] if prefill else []) + chunk + [(t, t + 1) for t in range(start, n)]
    torch.testing.assert_close(_run(ker, q, k, v, bounds), _run(ref, q, k, v, bounds), atol=2e-5, rtol=2e-5)
    nc = ker.n_coded
    assert nc == ref.n_coded
    # the host copy holds every coded token exactly, in the cache dtype (not the codes' reconstruction)
    assert torch.equal(ker.host.k[:nc].permute(1, 2, 0, 3), k[:, :, :nc])
    assert torch.equal(ker.host.v[:nc].permute(1, 2, 0, 3), v[:, :, :nc])
    if ref.last_retrieved is not None:
        assert torch.equal(ker.last_retrieved.sort(2).values, ref.last_retrieved.sort(2).values)


def test_kernel_store_long_chunks_over_a_coded_prefix_retrieve_too():
    """Chunked prefill (chunks long enough for the chunk path) over a coded prefix at retrieve_fraction 1.0 is exact
    attention, as in the reference."""
    ref, ker = _pair(1, 120, anchor_ratio=0.0, retrieve_fraction=1.0, retrieve_min=0)
    q, k, v = randn(1, H * 8, 110, D, seed=3), randn(1, H, 110, D, seed=4), randn(1, H, 110, D, seed=5)
    bounds = [(0, 40), (40, 90), (90, 110)]
    from antkv_compile.numerics.attention import causal_mask, exact_attention

    exact = exact_attention(q, k, v, 0.25, causal_mask(torch.arange(110), torch.arange(110)))[0]
    torch.testing.assert_close(_run(ker, q, k, v, bounds), exact, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(_run(ref, q, k, v, bounds), exact, atol=2e-5, rtol=2e-5)


def test_reference_store_keeps_no_full_precision_copy_on_the_device():
    """What the retrieval stores hold besides a plain store is the host copy (and, for the kernel store, the fixed
    exact budget of the extended anchor set): no float32 shadow of the cache."""
    geom = StoreGeometry(1, H, D, 64, torch.float16, torch.device("cpu"), scale=0.25)
    config = AnTKVConfig(bits="1", window=8, offload="host", retrieve_fraction=0.1, retrieve_min=2)
    cbk, cbv = codebook_with_transform("1", H, D, 1), codebook_with_transform("1", H, D, 2)
    plain, ret = AnTKVLayerStore(geom, cbk, cbv, config), RetrievalLayerStore(geom, cbk, cbv, config)
    extra = {k: v for k, v in vars(ret).items() if isinstance(v, torch.Tensor) and k not in vars(plain)}
    assert extra == {}, extra
    assert ret.host.k.dtype == torch.float16 and ret.host.k.device.type == "cpu"
    assert ret.host.nbytes() == 2 * 64 * H * D * 2


# ------------------------------------------------------------------ the product path
def _op_calls(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name == "antkv_rt::cache_attend")


@pytest.mark.parametrize("store", ["reference", "kernels"])
def test_compiled_generate_with_offload_equals_uncompiled_when_everything_is_retrieved(store):
    from antkv_compile.backend import last_compiles
    from antkv_compile.models import tiny_model

    torch._dynamo.reset()
    model = tiny_model("llama")
    model.compile(backend="antkv", options={"offload": "host", "retrieve_fraction": 1.0, "retrieve_min": 0,
                                            "anchor_ratio": 0.0, "window": 4, "inner": "eager", "store": store})
    last_compiles.clear()
    ref = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    new = 6
    kw = dict(max_new_tokens=new, do_sample=False, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    out, calls = _op_calls(lambda: model.generate(ids, **kw))
    expected = ref.generate(ids, **kw)
    assert calls >= 2 * new
    assert out.sequences.tolist() == expected.sequences.tolist()
    # the logits too (a tiny random model's greedy tokens hardly react to the cache: 1-bit codes alone keep them)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    session = next(r["session"] for r in last_compiles if "session" in r)
    stores = [*session.stores.values(), *session.orphans.values()]  # (the generate's cache is gone: orphans)
    assert len(stores) == 2
    kinds = {type(s).__name__ for s in stores}
    assert kinds == {"RetrievalLayerStore" if store == "reference" else "OffloadKernelStore"}
    for s in stores:  # retrieval ran, over every coded non-anchor token, from the host copy
        assert s.n_coded > 0 and s.last_retrieved is not None and s.last_retrieved.shape[2] == s.n_coded
        assert s.host.bytes_read > 0 and s.host.bytes_written == 2 * s.n_coded * s.geom.num_kv_heads * s.geom.head_dim * 4
    assert session.memory_bytes()["host_kv"] > 0
    session.stores.clear()  # the session outlives the test: free its stores (and their device workspace)
    session.orphans.clear()
    torch._dynamo.reset()


def test_offload_bench_dry_runs_every_configuration(tmp_path):
    """benchmarks/offload_bench.py --dry (tiny model, CPU): the retrieval point records the host traffic its stores
    measured, the offloaded-cache baseline its step, into the JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "offload_bench.py"
    spec = importlib.util.spec_from_file_location("offload_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--dry", "--points", "32k", "--offload-configs", "hf_offloaded,antkv-1-offload", "--quiet",
                     "--out", str(tmp_path), "--name", "dry"])
    assert rc == 0
    res = json.loads((tmp_path / "dry.json").read_text())
    assert res["complete"] and res["device"]["h2d_GBps"] > 0
    recs = {r["config"]: r for r in res["offload"]}
    assert {r["status"] for r in recs.values()} == {"ok"}, [r.get("reason") for r in recs.values()]
    off = recs["antkv-1-offload"]
    assert off["store_class"] == "OffloadKernelStore" and off["antkv_options"]["offload"] == "host"
    # per step: the floor of 64 retrieved tokens of K and V (16 bf16 dims) per layer (2), KV head (2) and sequence (2)
    assert off["host_bytes_read_per_step"] == 64 * 2 * 16 * 2 * 2 * 2 * 2
    assert off["retrieved_per_layer_head"] == 64
    assert recs["hf_offloaded"]["step_ms"] > 0
