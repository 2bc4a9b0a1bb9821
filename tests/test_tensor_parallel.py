"""backend="antkv" under tensor parallelism (transformers' tp_plan, DTensor over torch.distributed), on CPU.

The ``distributed`` tests (``pytest -m distributed tests/test_tensor_parallel.py``; ~1.5 min on two shared
cores) save a 4-layer tiny Llama (4 query / 2 KV heads, head_dim 16) and a calibrated pre-RoPE 1-bit artifact,
then run ``tests/tp_worker.py`` twice at once: as one plain process (world size 1) and under ``torchrun
--nproc_per_node 2`` (gloo, world size 2: each rank holds 2 query heads and 1 KV head). Bounds:

* ``anchor_ratio=1.0``: every flushed token is an anchor, attention is exact: greedy tokens of world size 2
  equal world size 1 (and the uncompiled model);
* quantized (1 % anchors, window 8, flush 4: most of the 26 tokens coded at 1 bit): each KV head is coded by
  its own codebooks with the same numbers on one rank or two, so logits agree to 1e-4 (measured 1.2e-7, the
  o_proj all-reduce's reassociation), while quantization moves them by ~0.5 against the uncompiled model.

The other tests run in the normal suite, in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from antkv_compile.artifact import ArtifactError, ArtifactMismatchError, CodebookArtifact
from antkv_compile.tensor_parallel import KVShard

ROOT = Path(__file__).resolve().parents[1]
QUANT_BOUND = 1e-4


def _artifact(heads=2, layers=2, d=16, seed=0, num_kv_heads=None):
    from antkv_compile.config import get_preset
    from antkv_compile.numerics.vq import random_codebook

    p, gen = get_preset("1"), torch.Generator().manual_seed(seed)
    cbs = [[random_codebook(p, heads, d, generator=gen) for _ in range(layers)] for _ in range(2)]
    manifest = {"preset": {"name": p.name, "sub_dim": p.sub_dim, "code_bits": p.code_bits, "stages": p.stages},
                "tensors_sha256": "random", "model": {"num_kv_heads": num_kv_heads or heads}}
    return CodebookArtifact(cbs[0], cbs[1], manifest)


def _shard(start, count, total, world=2):
    g = 2  # query heads per KV head
    return KVShard(start, count, total, start * g, count * g, total * g, world, start // count)


# ------------------------------------------------------------------------------------ in process, normal run
def test_each_rank_gets_the_codebooks_of_its_own_kv_heads():
    art = _artifact(heads=4)
    part = art.for_kv_heads(_shard(2, 2, 4))
    for whole, sliced in zip(art.keys + art.values, part.keys + part.values):
        assert sliced.num_heads == 2
        assert torch.equal(sliced.centroids, whole.centroids[:, 2:4]) and torch.equal(sliced.mean, whole.mean[2:4])
        assert torch.equal(sliced.transform, whole.transform[2:4])
    assert part.kv_heads == {"start": 2, "count": 2, "of": 4}
    assert part.for_kv_heads(_shard(2, 2, 4)) is part  # the same slice again: nothing to do
    shared = _artifact(heads=1, num_kv_heads=4)  # one codebook for all heads: every rank uses it whole
    assert shared.for_kv_heads(_shard(1, 1, 4, world=4)).keys[0] is shared.keys[0]


def test_a_slice_is_its_own_configuration_and_cannot_be_saved(tmp_path):
    from antkv_compile.config import AnTKVConfig
    from antkv_compile.runtime.state import config_fingerprint

    art = _artifact(heads=2)
    a, b = art.for_kv_heads(_shard(0, 1, 2)), art.for_kv_heads(_shard(1, 1, 2))
    prints = {config_fingerprint(AnTKVConfig(), x) for x in (art, a, b)}
    assert len(prints) == 3  # two ranks in one process never share a session's codebooks
    with pytest.raises(ArtifactError, match="one tensor-parallel rank's slice"):
        a.save(tmp_path / "slice")


def test_an_artifact_that_does_not_fit_the_rank_layout_is_refused_with_what_to_do():
    with pytest.raises(ArtifactMismatchError, match=r"codebooks for 2 KV heads.*KV heads 1\.\.1 of 4.*Calibrate once "
                                                    r"on the unsharded model"):
        _artifact(heads=2).for_kv_heads(_shard(1, 1, 4, world=4))
    with pytest.raises(ArtifactMismatchError, match="already the slice of KV heads 0..0 of 2"):
        _artifact(heads=2).for_kv_heads(_shard(0, 1, 2)).for_kv_heads(_shard(1, 1, 2))


def test_a_graph_without_dtensors_is_not_sharded():
    from graph_capture import capture_step, tiny_model

    from antkv_compile.patterns import find_attention_sites
    from antkv_compile.tensor_parallel import kv_shard

    step = capture_step(tiny_model("llama"), step="decode")
    sites = find_attention_sites(step.gm).sites
    assert sites and kv_shard(step.gm, step.example_inputs, sites) == (None, None)


def test_a_hand_split_model_without_dtensors_is_told_how_to_shard_it():
    """A rank's graph with 1 of 2 KV heads but plain tensors: nothing says which head it holds."""
    from antkv_compile.model_facts import GraphFacts

    facts = GraphFacts("llama", (0, 1), 2, 1, 16, None, [])
    with pytest.raises(ArtifactMismatchError, match="transformers' tp_plan"):
        _artifact(heads=2).check_graph(facts)


# ------------------------------------------------------------------------------------ two processes (gloo)
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
    from antkv_compile.config import get_preset
    from antkv_compile.models import tiny_model
    from antkv_compile.numerics.codebook_learning import LearningOptions
    from antkv_compile.numerics.rope import model_rope_parameters

    d = tmp_path_factory.mktemp("tp")
    model = tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(d / "model")
    calib = torch.randint(3, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(5))
    stats = collect_statistics(model, calib, progress=False, key_space="pre_rope")
    art = learn_artifact(stats, get_preset("1"), options=LearningOptions(iters=4), model_info=model_identity(model, "tiny"),
                         text_info={}, progress=False, key_space="pre_rope", rope=model_rope_parameters(model))
    art.save(d / "art")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = [str(ROOT / "tests" / "tp_worker.py"), str(d / "model"), str(d / "art")]
    (d / "ws1").mkdir(), (d / "ws2").mkdir()
    procs = [subprocess.Popen([sys.executable, *worker, str(d / "ws1")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *worker, str(d / "ws2")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    load = lambda f: torch.load(f, weights_only=False)  # noqa: E731
    return {"artifact": art, "ws1": load(d / "ws1" / "rank0.pt"), "ws2": [load(d / "ws2" / f"rank{r}.pt") for r in (0, 1)]}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["exact", "exact_inductor"])
def test_world_size_2_greedy_tokens_equal_world_size_1_at_full_anchors(runs, case):
    one = runs["ws1"]
    assert one[case]["tokens"] == one["dense"][0]  # exact: the uncompiled model's tokens
    for rank in runs["ws2"]:
        assert rank[case]["tokens"] == one[case]["tokens"]
        assert rank[case]["fallback_warnings"] == [] and all(rank[case]["rewrites"])


@pytest.mark.distributed
def test_world_size_2_quantized_logits_within_bound_of_world_size_1(runs):
    one = runs["ws1"]["quantized"]
    moved = (one["logits"] - runs["ws1"]["dense"][1]).abs().max()
    assert moved > 100 * QUANT_BOUND  # quantization is visible: the bound below is not vacuous
    for rank in runs["ws2"]:
        assert rank["quantized"]["tokens"] == one["tokens"]
        assert (rank["quantized"]["logits"] - one["logits"]).abs().max() <= QUANT_BOUND


@pytest.mark.distributed
def test_each_rank_stores_and_codes_only_its_kv_heads(runs):
    art = runs["artifact"]
    assert set(runs["ws1"]["quantized"]["store_heads"].values()) == {2}
    for r, rank in enumerate(runs["ws2"]):
        q = rank["quantized"]
        assert q["store_heads"] == {layer: 1 for layer in range(4)}
        assert q["kv_slice"] == {"start": r, "count": 1, "of": 2}
        for layer, mean in enumerate(q["codebook_means"]):
            assert torch.equal(mean, art.keys[layer].mean[r:r + 1])


@pytest.mark.distributed
def test_a_layout_it_cannot_read_compiles_unchanged_with_one_warning(runs):
    """k/v_proj sharded, q_proj whole (tp_worker.fallback_case): the rank's query heads are not the groups of its
    KV heads; the backend names the layout and leaves the graph alone, so the numbers are the model's own."""
    for rank in runs["ws2"]:
        f = rank["fallback"]
        assert len(f["fallback_warnings"]) == 1 and "tensor_parallel_layout" in f["fallback_warnings"][0]
        assert not any(f["rewrites"])
        assert f["tokens"] == f["dense"][0]
        assert torch.allclose(f["logits"], f["dense"][1], atol=1e-5, rtol=0)
