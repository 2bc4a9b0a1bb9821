"""The codebook artifact: safetensors tensors + a JSON manifest, never pickle.

A directory holds ``codebooks.safetensors`` (per layer: ``layers.{i}.{key|value}.{centroids|
transform|inverse|mean}``) and ``manifest.json`` (format version, model identity and shapes,
preset, learning options, calibration text and token count, a checksum of the tensor file, and -- from
format version 2 -- a checksum of the manifest itself, so an edited manifest is refused like a corrupt one).
:func:`load_artifact` refuses a corrupt, edited, inconsistent (manifest vs tensor shapes) or foreign
directory; :meth:`CodebookArtifact.check_model` (a model's KV geometry) and
:meth:`CodebookArtifact.check_graph` (what the backend sees of the model in a Dynamo graph: geometry,
family, RoPE, a weight fingerprint) refuse an artifact calibrated for another model, each with what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import VQPreset, get_preset
from .numerics.vq import Codebook

FORMAT = "antkv-codebooks"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum (manifest_sha256)
READABLE_VERSIONS = (1, 2)
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

    def check_graph(self, facts, allow_model_mismatch: bool = False) -> None:
        """Raise ArtifactMismatchError unless this artifact fits the model a Dynamo graph shows (``facts``:
        :class:`~antkv_compile.model_facts.GraphFacts`). Geometry and, for pre-RoPE keys, the RoPE frequencies
        must agree always; the model's identity (family, other RoPE, weight fingerprint) unless
        ``allow_model_mismatch`` (a deliberate reuse, e.g. on a fine-tune of the calibrated model)."""
        from .model_facts import family, fingerprint_matches

        want = self.manifest.get("model") or {}
        name = want.get("id", "?")
        fix = (f"Calibrate one for this model: antkv-compile calibrate --model <model> --bits {self.preset.name} "
               "--out <dir>")
        diffs = []
        for key, have in (("num_q_heads", facts.num_q_heads), ("num_kv_heads", facts.num_kv_heads),
                          ("head_dim", facts.head_dim)):
            if have is not None and want.get(key) is not None and want[key] != have:
                diffs.append(f"{key}: artifact {want[key]} vs model {have}")
        cb = self.keys[0] if self.keys else None
        if cb is not None and facts.head_dim is not None and cb.mean.shape[1] != facts.head_dim:
            diffs.append(f"codebook head_dim {cb.mean.shape[1]} vs model {facts.head_dim}")
        if cb is not None and facts.num_kv_heads is not None and cb.num_heads not in (1, facts.num_kv_heads):
            diffs.append(f"codebooks for {cb.num_heads} KV heads vs model {facts.num_kv_heads}")
        if facts.layers:
            n = max(facts.layers) + 1
            if n > self.num_layers or (facts.layers == tuple(range(n)) and n != self.num_layers):
                diffs.append(f"num_layers: artifact {self.num_layers} vs model {n}")
        rope_differs = (facts.inv_freq is not None and self.rope_inv_freq is not None and
                        (facts.inv_freq.shape != self.rope_inv_freq.shape or not torch.allclose(
                            facts.inv_freq.detach().float().cpu(), self.rope_inv_freq.float(), rtol=1e-4)))
        if rope_differs and self.key_space == "pre_rope":
            diffs.append("RoPE frequencies (inv_freq) differ, and pre-RoPE keys are rotated back with the "
                         "artifact's")
        if diffs:
            heads = want.get("num_kv_heads") or (cb.num_heads if cb is not None else None)
            if heads and facts.num_kv_heads and heads > facts.num_kv_heads and heads % facts.num_kv_heads == 0:
                fix += (f". If this graph is one tensor-parallel rank's ({facts.num_kv_heads} of {heads} KV heads), "
                        "shard the model with transformers' tp_plan (DTensor weights), so that the backend can tell "
                        "which KV heads the rank holds and slice the codebooks to them")
            raise ArtifactMismatchError(f"codebook artifact calibrated for {name!r} does not fit this model ("
                                        + "; ".join(diffs) + f"). {fix}")
        if allow_model_mismatch:
            return
        ident = []
        have_family, want_family = facts.family, family(want.get("architecture"))
        if have_family and want_family and have_family != want_family:
            ident.append(f"architecture {want.get('architecture')} vs a {have_family} model")
        if rope_differs:
            ident.append("RoPE frequencies differ")
        if want.get("rope_inv_freq") is not None and facts.inv_freq is not None and not rope_differs:
            theirs = torch.tensor(want["rope_inv_freq"], dtype=torch.float32)
            if theirs.shape != facts.inv_freq.shape or not torch.allclose(theirs, facts.inv_freq.detach().float().cpu(), rtol=1e-4):
                ident.append("RoPE frequencies differ")
        if want.get("weights") and facts.params:
            matched, total = fingerprint_matches(want["weights"], facts.params)
            if matched < 0.9 * total:
                ident.append(f"only {matched} of this model's {total} weight tensors match the calibrated model's "
                             "(shape and norm)")
        if ident:
            raise ArtifactMismatchError(
                f"codebook artifact was calibrated for {name!r}, not this model (" + "; ".join(ident) + "): its "
                f"codebooks fit another model's keys and values. {fix}; or pass options={{'allow_model_mismatch': "
                "True} to reuse it deliberately (e.g. on a fine-tune of that model)")

    @property
    def kv_heads(self) -> dict | None:
        """``{"start", "count", "of"}`` when this artifact is a tensor-parallel rank's slice, else None."""
        return self.manifest.get("kv_heads")

    def for_kv_heads(self, shard) -> "CodebookArtifact":
        """This artifact's codebooks for the KV heads a tensor-parallel rank holds (``shard``:
        :class:`~antkv_compile.tensor_parallel.KVShard`), an in-memory slice that cannot be saved. Raises
        ArtifactMismatchError when the artifact's heads are not the model's (calibrate on the unsharded model
        and pass the same artifact to every rank)."""
        fix = ("Calibrate once on the unsharded model (world size 1: antkv-compile calibrate --model <model> --bits "
               f"{self.preset.name} --out <dir>) and pass that same artifact to every rank; each rank takes the "
               "codebooks of its own KV heads")
        have = self.kv_heads
        if have is not None:
            if (have["start"], have["count"], have["of"]) == (shard.start, shard.count, shard.total):
                return self
            raise ArtifactMismatchError(
                f"this codebook artifact is already the slice of KV heads {have['start']}..{have['start'] + have['count'] - 1}"
                f" of {have['of']}, but this rank holds {shard.describe()}. {fix}")
        want = (self.manifest.get("model") or {}).get("num_kv_heads")
        heads = {cb.num_heads for cb in (*self.keys, *self.values)}
        if (want is not None and want != shard.total) or not heads <= {1, shard.total}:
            got = want if want is not None else "/".join(str(h) for h in sorted(heads - {1}))
            raise ArtifactMismatchError(
                f"codebook artifact has codebooks for {got} KV heads, but this tensor-parallel rank holds "
                f"{shard.describe()}: the artifact does not fit the sharded model's heads. {fix}")
        manifest = dict(self.manifest)
        manifest["kv_heads"] = {"start": shard.start, "count": shard.count, "of": shard.total}
        return CodebookArtifact([cb.select_heads(shard.start, shard.count) for cb in self.keys],
                                [cb.select_heads(shard.start, shard.count) for cb in self.values],
                                manifest, self.rope_inv_freq)

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
        if self.kv_heads is not None:
            raise ArtifactError("this artifact is one tensor-parallel rank's slice of KV heads; save the artifact it "
                                "was sliced from (calibrated on the unsharded model)")
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
        manifest.pop("manifest_sha256", None)
        manifest.update(format=FORMAT, format_version=FORMAT_VERSION, tensors_sha256=_sha256(d / TENSORS),
                        num_layers=self.num_layers)
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        self.manifest = manifest
        return d


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{d} is format version {manifest.get('format_version')}, this antkv_compile reads version "
            f"{FORMAT_VERSION}; re-run calibration with this version"
        )
    if manifest["format_version"] >= 2 and manifest_checksum(manifest) != manifest.get("manifest_sha256"):
        raise ArtifactError(f"{d / MANIFEST} does not match its own checksum (edited by hand or corrupt); re-run "
                            "calibration (antkv-compile calibrate ... --out DIR) instead of editing it")
    if manifest["format_version"] < 2:
        warnings.warn(f"{d}: format version {manifest['format_version']} artifact, its manifest is not covered by a "
                      "checksum (edits go unnoticed); re-run calibration to write version 2", UserWarning, stacklevel=2)
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
    problem = _inconsistency(art, tensors)
    if problem:
        raise ArtifactError(f"{d}: the manifest and the tensors disagree ({problem}); re-run calibration")
    art.check_key_layout(str(d))
    return art


def _inconsistency(art: CodebookArtifact, tensors: dict) -> str | None:
    """What in the manifest disagrees with the tensors' shapes, or None."""
    m = art.manifest
    stored = {int(k.split(".")[1]) for k in tensors if k.startswith("layers.")}
    if stored != set(range(art.num_layers)):
        return f"num_layers {m.get('num_layers')} but tensors for {len(stored)} layers"
    model = m.get("model") or {}
    if model.get("num_layers") is not None and model["num_layers"] != art.num_layers:
        return f"model num_layers {model['num_layers']} but {art.num_layers} layers of codebooks"
    p = art.preset
    for i, cb in enumerate(art.keys + art.values):
        layer = i % art.num_layers
        stages, h, _, m_, sub = cb.centroids.shape
        if (stages, m_, sub) != (p.stages, p.num_centroids, p.sub_dim):
            return (f"layer {layer}: centroids of {stages} stage(s) x {m_} x {sub}-dim, preset {p.name!r} needs "
                    f"{p.stages} x {p.num_centroids} x {p.sub_dim}")
        if model.get("num_kv_heads") is not None and h not in (1, model["num_kv_heads"]):
            return f"layer {layer}: codebooks for {h} heads, model num_kv_heads {model['num_kv_heads']}"
        if model.get("head_dim") is not None and cb.mean.shape[1] != model["head_dim"]:
            return f"layer {layer}: codebooks of head_dim {cb.mean.shape[1]}, model head_dim {model['head_dim']}"
    if art.rope_inv_freq is not None and model.get("head_dim") and 2 * art.rope_inv_freq.numel() != model["head_dim"]:
        return f"{art.rope_inv_freq.numel()} RoPE frequencies for head_dim {model['head_dim']}"
    return None
