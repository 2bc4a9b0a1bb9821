"""An artifact is checked against the model before anything is compiled: geometry, RoPE, family and a weight
fingerprint (the model's identity), with ``allow_model_mismatch`` for a deliberate reuse; an edited manifest or
one that disagrees with its tensors is refused at load time."""
import json

import pytest
import torch
from transformers import StaticCache

import antkv_compile.backend as backend
from antkv_compile.artifact import ArtifactError, ArtifactMismatchError, CodebookArtifact, load_artifact
from antkv_compile.models import tiny_model


def _calibrate(model, key_space="post_rope"):
    """A real (small) artifact of ``model``: statistics on 4 x 128 random tokens, 1-bit codebooks."""
    from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
    from antkv_compile.config import get_preset
    from antkv_compile.eval_suite import Recipe
    from antkv_compile.numerics.rope import model_rope_parameters

    ctx = torch.randint(3, 500, (4, 128), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, ctx, progress=False, key_space=key_space)
    recipe = Recipe("1", key_space=key_space)
    return learn_artifact(stats, get_preset("1"), options=recipe.key_options, value_options=recipe.value_options,
                          model_info=model_identity(model, "tiny-llama-seed0"), key_space=key_space,
                          rope=model_rope_parameters(model) if key_space == "pre_rope" else None,
                          text_info={"text": "random"}, progress=False)


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    _calibrate(tiny_model("llama")).save(d)
    return d


@pytest.fixture
def compile_calls(monkeypatch):
    calls = []
    real = backend._compile_fx

    def spy(gm, *a, **kw):
        calls.append(gm)
        return real(gm, *a, **kw)

    monkeypatch.setattr(backend, "_compile_fx", spy)
    return calls


def _run(model, artifact, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="antkv", options={"artifact": artifact, "inner": "eager", **options})
    with torch.no_grad():
        return compiled(input_ids=torch.tensor([[5, 6, 7, 8, 9]]),
                        past_key_values=StaticCache(config=model.config, max_cache_len=12))


def _refused(model, artifact, match, **options):
    with pytest.raises(Exception) as e:
        _run(model, artifact, **options)
    assert isinstance(getattr(e.value, "inner_exception", e.value), ArtifactMismatchError), repr(e.value)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_own_artifact_runs(artifact_dir, compile_calls):
    assert _run(tiny_model("llama"), str(artifact_dir)).logits.shape == (1, 5, 512)
    assert compile_calls


def test_artifact_of_another_model_refused_before_compiling_unless_allowed(artifact_dir, compile_calls):
    other = tiny_model("llama", seed=1)  # same architecture and shapes, other weights
    msg = _refused(other, str(artifact_dir), "calibrated for 'tiny-llama-seed0', not this model")
    assert "weight tensors match" in msg and "allow_model_mismatch" in msg
    assert not compile_calls  # refused before any compile
    assert _run(other, str(artifact_dir), allow_model_mismatch=True).logits.shape == (1, 5, 512)


@pytest.mark.parametrize("override, what", [({"num_key_value_heads": 1}, "num_kv_heads: artifact 2 vs model 1"),
                                            ({"num_hidden_layers": 3}, "num_layers: artifact 2 vs model 3"),
                                            ({"head_dim": 8}, "head_dim: artifact 16 vs model 8")])
def test_other_geometry_refused_before_compiling_even_when_allowed(artifact_dir, compile_calls, override, what):
    _refused(tiny_model("llama", **override), str(artifact_dir), what, allow_model_mismatch=True)
    assert not compile_calls


def test_pre_rope_artifact_with_other_rope_refused(tmp_path, compile_calls):
    _calibrate(tiny_model("llama"), key_space="pre_rope").save(tmp_path)
    other = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    _refused(other, str(tmp_path), "RoPE frequencies (inv_freq) differ", allow_model_mismatch=True)
    assert not compile_calls


def test_edited_manifest_is_refused(artifact_dir, tmp_path):
    for f in ("manifest.json", "codebooks.safetensors"):
        (tmp_path / f).write_bytes((artifact_dir / f).read_bytes())
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["model"]["id"] = "SmolLM2-135M-Instruct"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("field, value, what", [("num_layers", 3, "model num_layers 3 but 2 layers"),
                                                ("num_kv_heads", 4, "codebooks for 2 heads, model num_kv_heads 4"),
                                                ("head_dim", 32, "codebooks of head_dim 16, model head_dim 32")])
def test_manifest_disagreeing_with_its_tensors_is_refused(artifact_dir, tmp_path, field, value, what):
    art = load_artifact(artifact_dir)
    manifest = json.loads(json.dumps(art.manifest))
    manifest["model"][field] = value
    CodebookArtifact(art.keys, art.values, manifest).save(tmp_path)  # a consistent checksum, wrong content
    with pytest.raises(ArtifactError, match="the manifest and the tensors disagree") as e:
        load_artifact(tmp_path)
    assert what in str(e.value)
