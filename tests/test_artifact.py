import json

import pytest
import torch

from antkv_compile.artifact import ArtifactError, ArtifactMismatchError, CodebookArtifact, load_artifact
from antkv_compile.models import KVGeometry
from numerics_helpers import codebook_with_transform


def _artifact(layers=2, heads=3, bits="1"):
    manifest = {
        "model": {"id": "tiny", "num_layers": layers, "num_q_heads": 9, "num_kv_heads": heads, "head_dim": 16},
        "preset": {"name": bits},
    }
    return CodebookArtifact(
        [codebook_with_transform(bits, heads, 16, seed=i) for i in range(layers)],
        [codebook_with_transform(bits, heads, 16, seed=10 + i) for i in range(layers)],
        manifest,
    )


def _geometry(**kw):
    base = dict(num_layers=2, num_q_heads=9, num_kv_heads=3, head_dim=16, layer_kinds=("full", "full"))
    return KVGeometry(**(base | kw))


def test_round_trip_is_exact(tmp_path):
    art = _artifact()
    art.save(tmp_path)
    back = load_artifact(tmp_path)
    assert back.manifest["format_version"] == 2
    for a, b in zip(art.keys + art.values, back.keys + back.values):
        for f in ("centroids", "transform", "inverse", "mean"):
            assert torch.equal(getattr(a, f), getattr(b, f))
    back.check_model(_geometry(), model_id="tiny")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


@pytest.mark.parametrize("field, value", [("num_kv_heads", 2), ("head_dim", 32), ("num_layers", 3), ("num_q_heads", 6)])
def test_mismatched_model_is_refused_with_the_command_to_fix_it(tmp_path, field, value):
    art = _artifact()
    with pytest.raises(ArtifactMismatchError, match="antkv-compile calibrate"):
        art.check_model(_geometry(**{field: value}))


def test_other_model_with_same_shapes_and_other_preset_are_refused():
    art = _artifact()
    with pytest.raises(ArtifactMismatchError, match="another model"):
        art.check_model(_geometry(), model_id="someone-else")
    with pytest.raises(ArtifactMismatchError, match="0.375-bit was requested"):
        art.check_preset("0.375")


def test_corrupt_artifacts_are_refused(tmp_path):
    art = _artifact()
    art.save(tmp_path)
    data = bytearray((tmp_path / "codebooks.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "codebooks.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not a codebook artifact"):
        load_artifact(tmp_path / "missing")


def test_future_format_version_is_refused(tmp_path):
    _artifact().save(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(tmp_path)
