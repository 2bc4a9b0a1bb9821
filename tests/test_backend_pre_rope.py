"""backend="antkv" with a pre-RoPE key artifact: keys are unrotated by position, coded, rotated back."""
import pytest
import torch
from test_backend import _prompt, compiled, greedy, reference

from antkv_compile.artifact import load_artifact
from antkv_compile.backend import parse_options
from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
from antkv_compile.config import get_preset
from antkv_compile.models import tiny_model
from antkv_compile.numerics.codebook_learning import DEFAULT_PAIR_GROUPING, LearningOptions
from antkv_compile.numerics.rope_pairs import is_pair_layout
from antkv_compile.numerics.rope import model_rope_parameters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    calib = torch.randint(3, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(5))
    stats = collect_statistics(model, calib, progress=False, key_space="pre_rope")
    art = learn_artifact(stats, get_preset("1"), options=LearningOptions(iters=4), model_info=model_identity(model, "tiny"),
                         text_info={}, progress=False, key_space="pre_rope", rope=model_rope_parameters(model))
    return model, load_artifact(art.save(tmp_path_factory.mktemp("pre")))


def test_artifact_carries_the_models_rope(setup):
    model, art = setup
    assert art.key_space == "pre_rope"
    assert all(is_pair_layout(cb) for cb in art.keys)  # pre-RoPE keys are always in RoPE-pair sub-spaces
    assert art.manifest["key_options"]["pairs"] == DEFAULT_PAIR_GROUPING
    cos, sin = art.rope_table()(torch.arange(5, 9))
    rcos, rsin = model.model.rotary_emb(torch.zeros(1), torch.arange(5, 9)[None])
    torch.testing.assert_close(cos, rcos[0].float())
    torch.testing.assert_close(sin, rsin[0].float())


def test_pre_rope_backend_is_exact_at_full_anchors_and_matches_the_reference(setup):
    model, art = setup
    ids = _prompt(model, n=12)
    ref_toks, ref_logits, _ = greedy(model, model, ids)
    toks, logits, _ = greedy(compiled(model, artifact=art, anchor_ratio=1.0, window=4, inner="eager"), model, ids)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    opts = dict(artifact=art, anchor_ratio=0.1, window=4, inner="eager")
    toks_q, logits_q, _ = greedy(compiled(model, **opts), model, ids, teacher=torch.tensor([ref_toks]))
    torch.testing.assert_close(logits_q, reference(model, ids, toks_q, opts), atol=1e-4, rtol=1e-4)
    assert (logits_q - ref_logits).abs().max() > 1e-4


def test_pre_rope_without_artifact_or_with_a_contradicting_option_is_refused(setup):
    _, art = setup
    with pytest.raises(ValueError, match="needs a calibrated artifact"):
        parse_options({"key_space": "pre_rope"})
    with pytest.raises(ValueError, match="codes keys pre_rope"):
        parse_options({"artifact": art, "key_space": "post_rope"})
