import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.config import get_preset
from antkv_compile.planner import MemoryModel, ModelShape, llama3_8b_config, parse_bytes, plan


@pytest.fixture(scope="module")
def llama():
    return ModelShape.from_config(llama3_8b_config(), "llama3-8b")


def test_llama3_8b_shape_and_full_precision_bytes(llama):
    assert 8.0e9 < llama.params < 8.1e9
    full = MemoryModel(llama, None).bytes_at(1, 1000)
    assert full["kv_full_precision"] == 1000 * 128 * 1024  # 128 KiB per token in bf16


@pytest.mark.parametrize("bits", ["1", "0.375", "2"])
def test_codes_term_is_what_a_kernel_store_holds(llama, bits):
    """The planner's codes term against the buffers a KernelLayerStore of Llama-3-8B's head shape allocates: its
    code bytes per (token, KV head). Not the planner's formula: the store's tensors."""
    import torch

    from antkv_compile.config import AnTKVConfig
    from antkv_compile.numerics.store import StoreGeometry
    from antkv_compile.runtime.kernel_store import KernelLayerStore
    from numerics_helpers import codebook_with_transform

    h, d, cap = llama.num_kv_heads, llama.head_dim, 64
    geom = StoreGeometry(1, h, d, cap, torch.bfloat16, torch.device("cpu"), scale=d ** -0.5)
    cb = codebook_with_transform(bits, h, d, 0)
    store = KernelLayerStore(geom, cb, cb, AnTKVConfig(bits=bits), centroid_dtype=torch.float16)
    per_token_head = (store.codes_k.nbytes + store.codes_v.nbytes) // (cap * h)
    mm = MemoryModel(llama, get_preset(bits)).bytes_at(1, 1000)
    assert mm["codes"] == 1000 * llama.num_layers * h * per_token_head


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from(["1", "0.375", "2"]), batch=st.integers(1, 64), gb=st.integers(20, 140))
def test_longest_context_is_the_boundary_of_the_budget(llama, bits, batch, gb):
    mm = MemoryModel(llama, get_preset(bits))
    budget = gb * 10**9
    n = mm.longest_context(batch, budget)
    if n:
        assert mm.bytes_at(batch, n)["total"] <= budget < mm.bytes_at(batch, n + 1)["total"]
    else:
        assert mm.bytes_at(batch, 1)["total"] > budget


def test_compression_buys_context_and_fewer_bits_buy_more(llama):
    budget = parse_bytes("80GB")
    full, one, tiny = (plan(llama, b, budget, batches=(1,), contexts=(32768,)) for b in (None, "1", "0.375"))
    assert full["longest_context"][1] < one["longest_context"][1] < tiny["longest_context"][1]
    assert one["longest_context"][1] > 4_000_000  # the capacity target is within the model's reach
    assert full["largest_batch"][32768] < one["largest_batch"][32768]


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("512") == 512


def test_headroom_keeps_the_batches_that_ran_out_of_memory_out_of_reach(llama):
    """On the H100 (benchmarks/results/e2e_antkv.json) batches 181 (1 bit) and 344 (0.375 bit) at 32K ran out of
    memory inside a 77.66 GiB budget; 277 (0.375 bit) ran (e2e_antkv0375_plannermax.json). The default headroom
    (5 % of everything besides the weights) keeps the planner's answers below the failures."""
    budget = int(77.66 * (1 << 30))
    one, tiny = MemoryModel(llama, get_preset("1")), MemoryModel(llama, get_preset("0.375"))
    assert one.largest_batch(32832, budget) < 181 and tiny.largest_batch(32832, budget) < 344
    assert tiny.largest_batch(32832, budget) >= 256  # and still at least the batches measured to fit
    bare = MemoryModel(llama, get_preset("1"), headroom=0.0)
    assert bare.bytes_at(8, 32768)["total"] < one.bytes_at(8, 32768)["total"] < 1.05 * bare.bytes_at(8, 32768)["total"]


@pytest.mark.parametrize("bits", ["1", "0.375"])
def test_codebook_term_is_what_the_device_holds(llama, bits):
    """The planner counts the codebooks as resident on the GPU: each Codebook's tensors in fp32 (centroids, map,
    inverse, mean) plus the kernels' fp16 copy of the centroids (runtime/kernel_store.py), per layer and K / V."""
    import torch

    from antkv_compile.numerics.vq import Codebook

    p = get_preset(bits)
    h, d = llama.num_kv_heads, llama.head_dim
    cb = Codebook(torch.zeros(p.stages, h, d // p.sub_dim, p.num_centroids, p.sub_dim), torch.zeros(h, d, d),
                  torch.zeros(h, d, d), torch.zeros(h, d))
    per_book = sum(t.numel() * t.element_size() for t in cb.tensors()) + cb.centroids.to(torch.float16).nbytes
    term = MemoryModel(llama, p).bytes_at(1, 1)["codebooks"]
    assert term == llama.num_layers * 2 * per_book
    if bits == "1":
        assert term == 168_034_304  # session.memory_bytes()["codebooks"] on the H100 (e2e_memory_v9): 168.0 MB


def test_plan_cli_reads_the_config_only_and_knows_the_window(tmp_path, capsys):
    """A folder with a config.json and no weights is enough (nothing is loaded); contexts past the model's
    max_position_embeddings are marked and explained; the formula is one readable line (no sympy Max/Piecewise)."""
    from antkv_compile.cli import main
    from antkv_compile.models import tiny_config

    tiny_config("llama").save_pretrained(tmp_path)  # config.json only: loading weights would fail
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "1GB", "--batches", "1",
                 "--contexts", "512", "4096", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model window (max_position_embeddings): 1,024 positions" in out
    assert "context 4,096 *" in out and "context 512 *" not in out
    assert "the model attends to at most 1,024" in out
    line = next(l for l in out.splitlines() if l.startswith("antkv 1-bit bytes = "))
    assert "Max(" not in line and "Piecewise" not in line and " B N " in line


def test_plan_result_caps_the_usable_context_at_the_window():
    from antkv_compile.models import tiny_config

    shape = ModelShape.from_config(tiny_config("llama"), "tiny")
    r = plan(shape, "1", parse_bytes("1GB"), batches=(1,), contexts=(512,))
    assert r["max_position_embeddings"] == 1024
    assert r["longest_context"][1] > 1024 and r["longest_usable_context"][1] == 1024


# ------------------------------------------------------------------------------------ tensor parallel (per rank)
def test_tensor_parallel_divides_the_sharded_weights_and_the_kv_heads(llama):
    """Per rank: the parameters of the modules in transformers' tp_plan (attention and MLP projections,
    embedding, lm_head) divide by N, the norms stay whole; KV heads (codes, anchors, window, codebooks) divide."""
    assert 0 < llama.params - llama.sharded_params < 300_000  # Llama-3-8B: 65 RMSNorm weights of 4,096
    one, two = MemoryModel(llama, get_preset("1")), MemoryModel(llama, get_preset("1"), world_size=2)
    assert two.params_per_rank() == llama.params - llama.sharded_params + llama.sharded_params // 2
    a, b = one.bytes_at(4, 32768), two.bytes_at(4, 32768)
    for term in ("codes", "anchors", "window", "window_queries", "codebooks"):
        assert b[term] * 2 == pytest.approx(a[term], rel=1e-6), term


@pytest.mark.parametrize("bits", ["1", None])
def test_capacity_grows_about_n_fold_when_the_kv_heads_divide_evenly(llama, bits):
    """Longest context at batch 1 and largest batch at 32K on N GPUs of 141 GB against one: at least N-fold
    (weights shrink too), and not more than the KV bytes freed allow."""
    budget = parse_bytes("141GB")
    base = MemoryModel(llama, get_preset(bits) if bits else None)
    for n in (2, 4, 8):
        mm = MemoryModel(llama, get_preset(bits) if bits else None, world_size=n)
        assert n * base.longest_context(1, budget) <= mm.longest_context(1, budget)
        assert n * base.largest_batch(32768, budget) <= mm.largest_batch(32768, budget)
        # bounded: even with no weights at all, N ranks hold at most N x (budget / per-token bytes) tokens
        per_token = (base.bytes_at(1, 100_001)["total"] - base.bytes_at(1, 1)["total"]) / 100_000
        assert mm.longest_context(1, budget) <= n * budget / per_token * 1.01
    assert plan(llama, bits, budget, batches=(1,), contexts=(32768,), world_size=2)["world_size"] == 2


def test_a_world_size_that_does_not_divide_the_kv_heads_is_refused(llama):
    with pytest.raises(ValueError, match=r"world size 3 does not divide llama3-8b's 8 KV heads.*Use a world size in "
                                         r"\[1, 2, 4, 8\]"):
        MemoryModel(llama, get_preset("1"), world_size=3)
    with pytest.raises(ValueError, match="world size 16 does not divide"):
        plan(llama, "1", parse_bytes("80GB"), world_size=16)


def test_plan_cli_world_size(tmp_path, capsys):
    from antkv_compile.cli import main

    assert main(["plan", "--gpu-memory", "141GB", "--batches", "1", "--contexts", "32768", "--world-size", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, 2 GPUs (tensor parallel)" in out
    with pytest.raises(SystemExit, match="world size 3 does not divide"):
        main(["plan", "--world-size", "3", "--quiet"])


# ------------------------------------------------------------------ the retrieval mode (offload="host")
def test_offload_device_bytes_per_token_are_codes_plus_the_exact_budget_a_store_allocates(llama):
    """Per (layer, KV head, token), the device terms that grow with N in the retrieval mode -- codes, anchors and the
    extended anchor set -- against the buffers an OffloadKernelStore of Llama-3-8B's head shape allocates (at a
    capacity where k comes from the fraction, not the floor); and the host term is exactly its host copy."""
    import torch

    from antkv_compile.config import AnTKVConfig
    from antkv_compile.numerics.store import StoreGeometry
    from antkv_compile.runtime.host_kv import PinnedHostKV
    from antkv_compile.runtime.offload_store import OffloadKernelStore
    from numerics_helpers import codebook_with_transform

    h, d, cap = llama.num_kv_heads, llama.head_dim, 6400
    geom = StoreGeometry(1, h, d, cap, torch.bfloat16, torch.device("cpu"), scale=d ** -0.5)
    cb = codebook_with_transform("1", h, d, 0)
    store = OffloadKernelStore(geom, cb, cb, AnTKVConfig(offload="host"), centroid_dtype=torch.float16,
                               host=PinnedHostKV(geom))
    held = sum(t.nbytes for t in (store.codes_k, store.codes_v, store.anchor_k, store.anchor_v, store.anchor_pos,
                                  store.anchor_score, store.anchor_bits, store.ext_k, store.ext_v, store.ext_pos,
                                  store.ext_bits))
    mm = MemoryModel(llama, get_preset("1"), offload=True)
    at = mm.bytes_at(1, cap)
    planned = at["codes"] + at["anchors"] + at["retrieval"]
    per_layer = planned / llama.num_layers
    assert abs(per_layer - held) <= 0.002 * held, (per_layer, held)
    assert at["host_kv"] == at["host_total"] == llama.num_layers * store.host.nbytes()
    # the slope in N: code bytes + the exact budget (anchors at rho, their copy and the retrieved at rho + f, K/V/pos)
    e, n0, dn = 2, 1 << 20, 1 << 16
    slope = (mm.bytes_at(1, n0 + dn)["total"] - mm.bytes_at(1, n0)["total"]) / dn
    plain = MemoryModel(llama, get_preset("1"))
    plain_slope = (plain.bytes_at(1, n0 + dn)["total"] - plain.bytes_at(1, n0)["total"]) / dn
    budget = llama.num_layers * h * ((0.01 + 0.02) * (2 * d * e + 4) + 1 / 8 + 9 / llama.num_layers)
    assert abs(slope - plain_slope - budget * (1 + mm.headroom)) < 0.01 * slope
    assert slope < llama.num_layers * h * 2 * d * e / 8  # GPU KV memory <= 1/8 of FP16's per token


@pytest.mark.parametrize("batch, gpu", [(1, 141), (32, 80)])
def test_offload_longest_context_grows_with_host_memory_until_the_gpu_limits_it(llama, batch, gpu):
    mm = MemoryModel(llama, get_preset("1"), offload=True)
    budget = gpu * 10**9
    gpu_only = mm.longest_context(batch, budget)
    last = 0
    for host_gb in (16, 256, 4096, 10**6):
        n = mm.longest_context(batch, budget, host_gb * 10**9)
        assert last <= n <= gpu_only
        if n:  # the boundary: one more token breaks the host or the device budget
            assert mm.fits(batch, n, budget, host_gb * 10**9) and not mm.fits(batch, n + 1, budget, host_gb * 10**9)
        last = n
    assert last == gpu_only  # unlimited host memory: the device is the limit
    assert mm.longest_context(batch, budget, 16 * 10**9) < gpu_only  # a small host is the limit
    # the largest batch also grows with host memory
    small, big = (mm.largest_batch(32768, budget, h * 10**9) for h in (64, 2048))
    assert small <= big <= mm.largest_batch(32768, budget)


def test_offload_costs_the_device_a_little_more_than_antkv_alone(llama):
    budget = parse_bytes("141GB")
    plain = MemoryModel(llama, get_preset("1")).longest_context(1, budget)
    off = MemoryModel(llama, get_preset("1"), offload=True).longest_context(1, budget)
    full = MemoryModel(llama, None).longest_context(1, budget)
    assert full < off < plain
    assert MemoryModel(llama, None, offload=True).host_terms() == {}
