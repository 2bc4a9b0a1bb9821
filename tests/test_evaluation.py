"""The calibration + perplexity harness on real models (SmolLM2 and a tiny Llama)."""
import math

import pytest
import torch
import torch.nn.functional as F

from antkv_compile.artifact import load_artifact
from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
from antkv_compile.config import AnTKVConfig, get_preset
from antkv_compile.evaluation import MethodSpec, evaluate_method
from antkv_compile.models import tiny_model
from antkv_compile.numerics.codebook_learning import LearningOptions
from antkv_compile.texts import calibration_text, evaluation_text, token_contexts


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (2, 512), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, calib, progress=False)
    art = learn_artifact(stats, get_preset("1"), options=LearningOptions(iters=4), model_info=model_identity(model, "tiny"),
                         text_info={"text": "random ids"}, progress=False)
    path = art.save(tmp_path_factory.mktemp("art"))
    return model, load_artifact(path)


def _model_nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_full_precision_harness_equals_the_models_own_forward(tiny_setup):
    model, _ = tiny_setup
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2))
    r = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False)
    assert r.tokens == 2 * 99
    assert math.isclose(r.nll, _model_nll(model, ids), rel_tol=1e-5)


def test_prefill_protocol_counts_only_the_predictions_after_the_prompt(tiny_setup):
    """With a prompt chunk, the full-precision harness still equals the model's own forward on the tokens after
    the prompt (the chunk boundaries change nothing exact), and a prompt leaving nothing to predict is refused."""
    model, _ = tiny_setup
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(4))
    r = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False, prefill=60)
    assert r.tokens == 2 * 39  # positions 60..98 predict tokens 61..99 (position 59 is the prompt's own)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    tail = F.cross_entropy(logits[:, 60:-1].reshape(-1, logits.shape[-1]), ids[:, 61:].reshape(-1)).item()
    assert math.isclose(r.nll, tail, rel_tol=1e-5)
    with pytest.raises(ValueError, match="prefill"):
        evaluate_method(model, ids, MethodSpec("full", "full"), progress=False, prefill=99)


@pytest.mark.parametrize("path", ["lut", "dequantized"])
def test_everything_anchored_equals_full_precision(tiny_setup, path):
    model, art = tiny_setup
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3))
    full = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False)
    exact = evaluate_method(model, ids, MethodSpec("a", "antkv", AnTKVConfig(anchor_ratio=1.0, window=16, coded_path=path), "x"),
                            {"x": art}, progress=False)
    assert math.isclose(exact.nll, full.nll, rel_tol=1e-5)


def test_quantized_methods_cost_perplexity_and_bits_add_up(tiny_setup):
    model, art = tiny_setup
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(4))
    full = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False)
    lut = evaluate_method(model, ids, MethodSpec("q", "antkv", AnTKVConfig(window=16), "x"), {"x": art}, progress=False)
    deq = evaluate_method(model, ids, MethodSpec("q", "antkv", AnTKVConfig(window=16, coded_path="dequantized"), "x"),
                          {"x": art}, progress=False)
    kivi = evaluate_method(model, ids, MethodSpec("k", "kivi", AnTKVConfig(window=16), scalar_bits=2), progress=False)
    assert math.isclose(lut.nll, deq.nll, rel_tol=1e-4)  # the two read paths compute the same function
    assert lut.nll != full.nll and kivi.nll != full.nll
    assert lut.memory["codes"] == pytest.approx((128 - 8) / 128, rel=1e-6)  # 1 bit for every flushed token
    # effective bits per K/V element, each part derived here: 120 flushed tokens of 128 coded at 1 bit; ceil(1 % of
    # 120) = 2 anchors per (sequence, layer, KV head) of K + V at 16 bits and a 32-bit position; the window counted
    # full (16 tokens of K + V at 16 bits); the codebooks at 16 bits per number (centroids, mean, and the coding map:
    # D/2 pair indices per head in the RoPE-pair layout, else D x D), over the 2 x 128 tokens evaluated
    cfg = model.config
    layers, hkv = cfg.num_layers if hasattr(cfg, "num_layers") else cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elements = 2 * 128 * layers * hkv * d * 2
    key_map = d // 2 if art.key_space == "pre_rope" else d * d  # pre-RoPE keys: the RoPE-pair layout
    book_numbers = sum(cb.centroids.numel() + cb.mean.numel() + cb.num_heads * (key_map if kind == "k" else d * d)
                       for kind, books in (("k", art.keys), ("v", art.values)) for cb in books)
    expected = {"codes": 120 / 128, "anchors": 2 * (2 * d * 16 + 32) / (128 * d * 2), "window": 16 * 16 / 128,
                "codebooks": 16 * book_numbers / elements}
    assert lut.memory == pytest.approx(expected, rel=1e-6)
    assert lut.effective_bits == pytest.approx(sum(expected.values()), rel=1e-6)


def test_mismatched_artifact_is_refused_by_the_harness(tiny_setup):
    from antkv_compile.artifact import ArtifactMismatchError

    model, art = tiny_setup
    other = tiny_model("llama", num_key_value_heads=4)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ArtifactMismatchError, match="does not match this model"):
        evaluate_method(other, ids, MethodSpec("q", "antkv", AnTKVConfig(), "x"), {"x": art}, progress=False)


@pytest.mark.slow
def test_smollm2_harness_matches_its_forward_and_texts_are_disjoint(smollm2):
    model, tok = smollm2
    ids = token_contexts(tok, evaluation_text(), 96, num_contexts=1)
    r = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False)
    assert math.isclose(r.nll, _model_nll(model, ids), rel_tol=1e-4)
    assert 1.0 < r.perplexity < 200.0
    assert evaluation_text()[:2000] not in calibration_text()


def test_retrieval_methods_through_the_harness(tiny_setup):
    """The retrieval mode in the harness: retrieving every coded token is full precision; retrieving some moves the
    perplexity from the plain 1-bit store's towards it; the named methods resolve to the retrieval store."""
    from antkv_compile.eval_suite import METHODS, RETRIEVE

    model, art = tiny_setup
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(5))
    cfg = dict(window=16, anchor_ratio=0.0)
    full = evaluate_method(model, ids, MethodSpec("full", "full"), progress=False)
    nll = {}
    for frac in (0.0, 0.25, 1.0):
        spec = MethodSpec("r", "antkv", AnTKVConfig(offload="host", retrieve_fraction=frac, retrieve_min=0, **cfg), "x")
        nll[frac] = evaluate_method(model, ids, spec, {"x": art}, progress=False).nll
    plain = evaluate_method(model, ids, MethodSpec("q", "antkv", AnTKVConfig(**cfg), "x"), {"x": art}, progress=False)
    assert math.isclose(nll[1.0], full.nll, rel_tol=1e-5)
    assert nll[0.0] == pytest.approx(plain.nll, rel=1e-6) and plain.nll != pytest.approx(full.nll, rel=1e-4)
    assert abs(nll[0.25] - full.nll) < abs(plain.nll - full.nll)
    assert METHODS["antkv-1-retrieve"].config.offload == "host" and METHODS["antkv-1-retrieve"].config.retrieve_fraction == 0.02
    assert [METHODS[m].config.retrieve_fraction for m in RETRIEVE if m.startswith("antkv-1-retrieve-")] == \
        [0.005, 0.01, 0.02, 0.05]
