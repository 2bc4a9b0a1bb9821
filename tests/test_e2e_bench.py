"""The end-to-end benchmark (``antkv_compile.bench``, ``antkv-compile bench``) on the CPU with the tiny Llama.

One run goes through every part (throughput with a batch sweep for baseline (b) and antkv, capacity
with the decode check, chunked prefill + decode, memory) at tiny sizes with
``inner='eager'``; the tests then check the JSON it wrote: schema, statuses, and that the memory accounting
adds up (components sum to the totals, the antkv dense cache is released, 1-bit codes are what the planner
counts). The Llama-3-8B shape is exercised through ``--plan-only`` (planner only, no model).
"""
from __future__ import annotations

import json

import pytest
import torch

from antkv_compile import bench
from antkv_compile.config import AnTKVConfig

TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 2  # K+V x 2 layers x 2 KV heads x head_dim 16 x bf16
POINT_KEYS = {"purpose", "config", "kind", "batch", "context", "capacity", "status", "step_ms", "tokens_per_s",
              "first_step_s", "bound_ms", "bound_fraction", "memory", "planner"}
MEMORY_KEYS = {"weights", "codes", "anchors", "window_kv", "window_queries", "window", "codebooks", "scratch", "dense_kv",
               "cache_total", "accounted", "bf16_cache_equivalent"}


ARGS = ["--shape", "tiny", "--device", "cpu", "--runs", "throughput,capacity,prefill128k,memory",
        "--configs", "dense_decode,antkv-0.375", "--contexts", "160", "--batches", "auto", "--max-batch", "2",
        "--steps", "2", "--warmup", "1", "--prompt-len", "16", "--inner", "eager", "--prompt-inner", "eager",
        "--baseline-backend", "eager", "--antkv-options", '{"store": "kernels"}', "--capacity-configs", "antkv-1",
        "--capacity-context", "192", "--prefill-configs", "antkv-1", "--prefill-context", "128", "--prefill-chunk", "64",
        "--budget", "1GiB", "--progress-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    torch._dynamo.reset()
    rc = bench.main([*ARGS, "--out", str(out), "--name", "tiny"])
    payload = json.loads((out / "tiny.json").read_text())
    return rc, payload, out


def _ok(points):
    return [p for p in points if p["status"] == "ok"]


def test_every_part_ran_and_files_were_written(result):
    rc, r, out = result
    assert rc == 0, r["errors"]
    assert r["complete"] and not r["errors"]
    assert all(v["ok"] for v in r["sections"].values())
    assert set(r["sections"]) == {"setup", "throughput", "capacity", "prefill128k", "memory"}
    assert (out / "tiny.log").exists()
    assert {p.split("/")[-1] for p in r["plots"]} == {"tiny_throughput.png", "tiny_memory.png"}
    env = r["environment"]
    for k in ("date", "device", "torch", "transformers", "command", "git"):
        assert k in env
    assert any("random bf16 weights" in n for n in r["notes"])
    assert r["model"]["shape"] == "tiny" and r["model"]["kv_bytes_per_token_bf16"] == TINY_KV_BYTES_PER_TOKEN
    assert "random bf16 weights" in r["markdown"]
    assert "quality" not in r  # quality has its own commands (antkv-compile eval / fidelity)


def test_throughput_sweep_schema_and_summary(result):
    _, r, _ = result
    pts = r["throughput"]
    assert {(p["config"], p["batch"]) for p in _ok(pts)} == {
        (c, b) for c in ("dense_decode", "antkv-0.375") for b in (1, 2)}
    for p in _ok(pts):
        assert POINT_KEYS <= set(p), POINT_KEYS - set(p)
        assert p["step_ms"] > 0 and p["tokens_per_s"] == pytest.approx(p["batch"] / (p["step_ms"] / 1e3))
        assert p["planner_largest_batch"] >= 2 and p["planner"]["fits_budget"]
        assert p["bound_ms"] > 0 and p["context"] == 160
    s = r["summary"]
    assert set(s["best"]) == {"dense_decode@160", "antkv-0.375@160"}
    ratio = s["ratios"]["antkv-0.375@160"]["vs_dense_decode"]
    assert ratio == pytest.approx(s["best"]["antkv-0.375@160"]["tokens_per_s"] / s["best"]["dense_decode@160"]["tokens_per_s"])
    assert s["largest_batch"]["antkv-0.375@160"]["measured_largest_batch"] == 2
    antkv = [p for p in _ok(pts) if p["kind"] == "antkv"]
    assert all(p["fill"].startswith("store.fill") and p["store_class"] == "KernelLayerStore" for p in antkv)


def test_memory_accounting_adds_up(result):
    _, r, _ = result
    pts = [p for k in ("throughput", "capacity", "prefill", "memory_points") for p in _ok(r[k])]
    assert len(pts) >= 6
    for p in pts:
        m = p["memory"]
        assert MEMORY_KEYS <= set(m)
        assert m["window"] == m["window_kv"] + m["window_queries"]
        assert m["cache_total"] == m["codes"] + m["anchors"] + m["window"] + m["codebooks"] + m["scratch"] + m["dense_kv"]
        assert m["accounted"] == m["weights"] + m["cache_total"]
        assert m["weights"] == r["model"]["weight_bytes"]
        if p["kind"] == "dense":
            assert m["codes"] == m["anchors"] == m["window"] == m["codebooks"] == 0
            assert m["dense_kv"] == p["batch"] * p["capacity"] * TINY_KV_BYTES_PER_TOKEN
        else:
            assert m["dense_kv"] <= 64  # released to one element per buffer after the rewrite
            assert m["codes"] > 0 and m["anchors"] > 0 and m["window_kv"] > 0 and m["codebooks"] > 0
            assert m["codes"] + m["anchors"] < m["bf16_cache_equivalent"]
            if p["bits"] == "1":  # 1 bit: codes are exactly what the planner counts
                assert m["codes"] == p["planner"]["terms"]["codes"]
    memory_rows = r["markdown"].split("Memory accounting")[1]
    assert "antkv-1" in memory_rows and "dense_decode" in memory_rows


def test_capacity_and_prefill_decode_checked_against_reference(result):
    _, r, _ = result
    (cap,) = r["capacity"]
    assert cap["status"] == "ok" and cap["context"] == 192 and cap["batch"] == 1
    assert cap["check"]["ok"] and set(cap["check"]["layers"]) == {"0", "1"}
    assert all(v["rel_err"] < 1e-2 for v in cap["check"]["layers"].values())
    assert cap["planner_longest_context"] > cap["capacity"] and cap["bf16_planner_longest_context"] > 0
    assert cap["fill_tokens_per_s"] > 0 and not cap["target_met"]  # 192 tokens is not 4M
    (pre,) = r["prefill"]
    assert pre["status"] == "ok" and pre["context"] == 128 and pre["chunk"] == 64
    assert pre["check"]["ok"] and pre["prefill_tokens_per_s"] > 0
    assert pre["memory"]["dense_kv"] <= 64


def test_merge_combines_calls(result, tmp_path):
    _, r, out = result
    rc = bench.main(["--merge", str(out / "tiny.json"), str(out / "tiny.json"), "--out", str(tmp_path),
                     "--name", "merged", "--quiet"])
    assert rc == 0
    m = json.loads((tmp_path / "merged.json").read_text())
    assert len(m["throughput"]) == 2 * len(r["throughput"]) and len(m["merged_from"]) == 2
    assert (tmp_path / "merged_memory.png").exists()


def test_reference_slice_equals_the_reference_store():
    """The check's fp32 reference reproduces AnTKVLayerStore.attend (plain PyTorch) on a decode step."""
    from antkv_compile.config import get_preset
    from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
    from antkv_compile.numerics.vq import random_codebook

    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, d, n = 2, 4, 2, 16, 150
    cfg = AnTKVConfig(bits="1", window=16, anchor_ratio=0.05)
    cbk, cbv = (random_codebook(get_preset("1"), hkv, d, generator=gen) for _ in range(2))
    store = AnTKVLayerStore(StoreGeometry(b, hkv, d, 256, torch.float32, torch.device("cpu"), d ** -0.5), cbk, cbv, cfg)
    store.attend(torch.randn(b, hq, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen),
                 torch.randn(b, hkv, n, d, generator=gen))
    assert store.n_coded > 0 and store.num_anchors > 0
    q, k, v = torch.randn(b, hq, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
    with bench.DecodeChecker({0: store}, [0], batch=1, kv_head=1) as chk:
        ref = bench.reference_slice(store, q, k, v, batch=1, kv_head=1, block=64)  # blocks of the coded part
        out = store.attend(q, k, v)
    assert torch.allclose(out[1:2, 2:4].float(), ref, atol=1e-5, rtol=1e-4)
    assert chk.results[0]["rel_err"] < 1e-5 and chk.results[0]["position"] == n
    assert "attend" not in store.__dict__  # unwrapped again


def test_plan_only_llama3_8b(capsys):
    rc = bench.main(["--plan-only", "--budget", "80GB", "--configs", "antkv-1", "--runs", "throughput,capacity"])
    assert rc == 0
    text = capsys.readouterr().out
    plan = json.loads(text[text.index("{"):])
    assert plan["capacity"]["antkv-1"]["context"] >= bench.TARGET_CAPACITY
    assert plan["throughput"]["antkv-1@32768"]["planner_largest_batch"] > 100


def test_cli_has_bench():
    from antkv_compile.cli import build_parser

    args = build_parser().parse_args(["bench", "--shape", "tiny", "--runs", "memory"])
    assert args.func.__name__ == "cmd_bench" and args.shape == "tiny" and args.batches == "auto"


def test_batch_sweep_lists():
    assert bench.batch_list("auto", 15, 1024) == [1, 2, 4, 8, 15]
    assert bench.batch_list("auto", 185, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert bench.batch_list("1,16,max", 351, 1024) == [1, 16, 351]
    assert bench.batch_list("1,max", 0, 8) == [1]


def test_sweep_stops_at_out_of_memory(tmp_path, monkeypatch):
    """Baseline (a) (Inductor backend replaced by eager on the CPU). An OOM ends the configuration's sweep, is recorded with its reason, and the summary reports the
    largest batch that ran and the first that did not."""
    real = bench.Bench._dense_point

    def dense_point(self, spec, rec):
        if rec["batch"] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(self, spec, rec)

    monkeypatch.setattr(bench.Bench, "_dense_point", dense_point)
    torch._dynamo.reset()
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--runs", "throughput", "--configs", "inductor",
                     "--contexts", "64", "--batches", "1,2,4", "--steps", "1", "--warmup", "1",
                     "--baseline-backend", "eager", "--budget", "1GiB", "--out", str(tmp_path), "--name", "oom", "--quiet"])
    r = json.loads((tmp_path / "oom.json").read_text())
    assert rc == 0
    assert [(p["batch"], p["status"]) for p in r["throughput"]] == [(1, "ok"), (2, "oom")]
    assert "out of memory" in r["throughput"][1]["reason"]
    lb = r["summary"]["largest_batch"]["inductor@64"]
    assert lb["measured_largest_batch"] == 1 and lb["first_oom_batch"] == 2


def test_plan_only_world_size_2_gives_each_rank_about_twice_the_capacity(capsys):
    """Tensor parallel over 2 GPUs: the planner's points per rank (KV heads and sharded weights halved)."""
    args = ["--plan-only", "--budget", "141GB", "--configs", "antkv-1,dense_decode", "--runs", "throughput,capacity"]
    plans = []
    for n in (1, 2):
        assert bench.main(args + ["--world-size", str(n)]) == 0
        text = capsys.readouterr().out
        plans.append(json.loads(text[text.index("{"):]))
    one, two = plans
    assert two["world_size"] == 2
    assert two["capacity"]["antkv-1"]["planner_longest"] >= 2 * one["capacity"]["antkv-1"]["planner_longest"]
    for c in ("antkv-1@32768", "dense_decode@32768"):
        assert two["throughput"][c]["planner_largest_batch"] >= 2 * one["throughput"][c]["planner_largest_batch"]
    with pytest.raises(SystemExit, match="world size 3 does not divide"):
        bench.main(args + ["--world-size", "3"])
