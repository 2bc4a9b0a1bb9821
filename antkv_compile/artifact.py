"""The codebook artifact: safetensors tensors + a JSON manifest, never pickle.

A directory holds ``codebooks.safetensors`` (per layer: ``layers.{i}.{key|value}.{centroids|
transform|inverse|mean}``) and ``manifest.json`` (format version, model identity and shapes,
preset, learning options, calibration text and token count, a checksum of the tensor file).
:meth:`CodebookArtifact.check_model` refuses an artifact that does not fit the model it is used
with, and :func:`load_artifact` refuses a corrupt or foreign directory, each with what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import VQPreset, get_preset
from .numerics.vq import Codebook

FORMAT = "antkv-codebooks"
FORMAT_VERSION = 1
TENSORS = "codebooks.safetensors"
MANIFEST = "manifest.json"
_FIELDS = ("centroids", "transform", "inverse", "mean")


class ArtifactError(RuntimeError):
    """The artifact cannot be read (missing, corrupt, wrong format or version)."""


class ArtifactMismatchError(ValueError):
    """The artifact was calibrated for a different model or preset."""


DENSE_PRE_ROPE_MESSAGE = (
    "{where} codes keys before RoPE through a dense per-head coding map (an artifact from before RoPE-pair "
    "sub-spaces); no kernel can decode it, and pre-RoPE artifacts are now always in the RoPE-pair layout. "
    "Recalibrate it: antkv-compile calibrate --pre-rope --bits {bits} --out <dir>"
)


@dataclasses.dataclass
class CodebookArtifact:
    keys: list[Codebook]  # one per layer (None-free; layers without a store are not calibrated)
    values: list[Codebook]
    manifest: dict[str, Any]
    rope_inv_freq: Any = None  # pre-RoPE key artifacts: the model's RoPE frequencies (manifest["rope"])

    @property
    def key_space(self) -> str:
        return self.manifest.get("key_space", "post_rope")

    def rope_table(self):
        """cos/sin provider for pre-RoPE keys, or None for post-RoPE artifacts."""
        if self.key_space != "pre_rope":
            return None
        if self.rope_inv_freq is None:
            raise ArtifactError("this pre-RoPE artifact carries no RoPE frequencies; re-run calibration")
        from .numerics.rope import InvFreqRope

        return InvFreqRope(self.rope_inv_freq, self.manifest.get("rope", {}).get("attention_scaling", 1.0))

    @property
    def preset(self) -> VQPreset:
        p = self.manifest["preset"]
        if {"sub_dim", "code_bits"} <= p.keys():
            return VQPreset(p["name"], p["sub_dim"], p["code_bits"], p.get("stages", 1))
        return get_preset(p["name"])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def storage_bits(self) -> int:
        return sum(cb.storage_bits() for cb in (*self.keys, *self.values))

    def check_model(self, geometry, model_id: str | None = None) -> None:
        """Raise ArtifactMismatchError unless this artifact fits a model of ``geometry`` (KVGeometry)."""
        want = self.manifest["model"]
        have = {
            "num_layers": geometry.num_layers,
            "num_kv_heads": geometry.num_kv_heads,
            "num_q_heads": geometry.num_q_heads,
            "head_dim": geometry.head_dim,
        }
        diffs = [f"{k}: artifact {want.get(k)} vs model {v}" for k, v in have.items() if want.get(k) != v]
        if diffs:
            raise ArtifactMismatchError(
                f"codebook artifact calibrated for {want.get('id', '?')!r} does not match this model ("
                + "; ".join(diffs)
                + "). Calibrate one for this model: antkv-compile calibrate --model <model> --bits "
                + f"{self.manifest['preset']['name']} --out <dir>"
            )
        if model_id is not None and want.get("id") not in (None, model_id):
            raise ArtifactMismatchError(
                f"codebook artifact was calibrated for {want.get('id')!r}, not {model_id!r}; shapes agree but "
                f"the codebooks fit another model's activations. Calibrate one for {model_id!r}."
            )

    def check_key_layout(self, where: str = "this codebook artifact") -> None:
        """Raise ArtifactError for a pre-RoPE artifact whose key codebooks are not in the RoPE-pair layout."""
        from .numerics.rope_pairs import is_pair_layout

        if self.key_space == "pre_rope" and not all(is_pair_layout(cb) for cb in self.keys):
            raise ArtifactError(DENSE_PRE_ROPE_MESSAGE.format(where=where, bits=self.preset.name))

    def check_preset(self, bits: str | VQPreset) -> None:
        want = get_preset(bits)
        if (want.sub_dim, want.code_bits, want.stages) != (self.preset.sub_dim, self.preset.code_bits, self.preset.stages):
            raise ArtifactMismatchError(
                f"the artifact holds {self.preset.name}-bit codebooks but {want.name}-bit was requested; pass "
                f"bits={self.preset.name!r} or calibrate a {want.name}-bit artifact"
            )

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (ck, cv) in enumerate(zip(self.keys, self.values)):
            for kind, cb in (("key", ck), ("value", cv)):
                for f in _FIELDS:
                    tensors[f"layers.{i}.{kind}.{f}"] = getattr(cb, f).detach().float().cpu().contiguous()
        if self.rope_inv_freq is not None:
            tensors["rope.inv_freq"] = self.rope_inv_freq.detach().float().cpu().contiguous()
        save_file(tensors, str(d / TENSORS))
        manifest = dict(self.manifest)
        manifest.update(format=FORMAT, format_version=FORMAT_VERSION, tensors_sha256=_sha256(d / TENSORS),
                        num_layers=self.num_layers)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        self.manifest = manifest
        return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_artifact(directory: str | Path) -> CodebookArtifact:
    d = Path(directory)
    if not (d / MANIFEST).is_file() or not (d / TENSORS).is_file():
        raise ArtifactError(
            f"{d} is not a codebook artifact (needs {MANIFEST} and {TENSORS}); create one with "
            f"antkv-compile calibrate --out {d}"
        )
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{d / MANIFEST} is not valid JSON ({e}); re-run calibration") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{d} holds format {manifest.get('format')!r}, not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{d} is format version {manifest.get('format_version')}, this antkv_compile reads version "
            f"{FORMAT_VERSION}; re-run calibration with this version"
        )
    if _sha256(d / TENSORS) != manifest.get("tensors_sha256"):
        raise ArtifactError(f"{d / TENSORS} does not match its manifest checksum (corrupt or edited); re-run calibration")
    try:
        tensors = load_file(str(d / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {d / TENSORS}: {e}; re-run calibration") from e
    keys, values = [], []
    try:
        for i in range(int(manifest["num_layers"])):
            for kind, out in (("key", keys), ("value", values)):
                out.append(Codebook(*(tensors[f"layers.{i}.{kind}.{f}"] for f in _FIELDS)))
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{d} is missing or has malformed tensors ({e}); re-run calibration") from e
    art = CodebookArtifact(keys, values, manifest, tensors.get("rope.inv_freq"))
    if art.keys and art.keys[0].nominal_bits != art.preset.nominal_bits:
        raise ArtifactError(f"{d}: tensors do not match the preset named in the manifest")
    art.check_key_layout(str(d))
    return art
