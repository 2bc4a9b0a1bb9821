"""Offline token-aware centroid learning: run the model over calibration text, learn codebooks.

1. :func:`collect_statistics` runs the unchanged model (exact attention) over calibration contexts
   and keeps, per layer and KV head, the post-RoPE keys and the values, each token's sensitivity
   weights from the first-order error analysis (:func:`weights_for_calibration`), and the query
   covariance that defines the key metric. The value metric is the output projection's Gram
   matrix, read from the weights.
2. :func:`learn_artifact` fits one :class:`Codebook` per layer for keys and for values with
   weighted k-means in the metric-aware coding space, and wraps them with a manifest.
3. :func:`load_or_calibrate`: both steps on the calibration text, saved to a directory and reused from then on
   (what the demo and the examples call).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .artifact import CodebookArtifact
from .config import VQPreset
from .hf_routing import chunk_logits, routed
from .models import kv_geometry
from .numerics.anchor_score import weights_for_calibration
from .numerics.attention import causal_mask, exact_attention, group_queries
from .numerics.codebook_learning import DEFAULT_PAIR_GROUPING, LearningOptions, learn_codebook
from .numerics.rope import RopeTable, unrotate


@dataclasses.dataclass
class LayerStatistics:
    keys: list[Tensor] = dataclasses.field(default_factory=list)  # [H, n, D] float32 chunks
    values: list[Tensor] = dataclasses.field(default_factory=list)
    w_key: list[Tensor] = dataclasses.field(default_factory=list)  # [H, n]
    w_value: list[Tensor] = dataclasses.field(default_factory=list)
    query_outer: Tensor | None = None  # [H, D, D] sum of q q^T over the group's query heads
    query_sum: Tensor | None = None  # [H, D]
    query_count: int = 0
    value_metric: Tensor | None = None  # [H, D, D]

    def cat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (torch.cat(self.keys, 1), torch.cat(self.values, 1), torch.cat(self.w_key, 1), torch.cat(self.w_value, 1))

    @property
    def query_covariance(self) -> Tensor:
        """E[q q^T] over the queries that read each KV head."""
        return self.query_outer / max(self.query_count, 1)

    @property
    def query_covariance_centered(self) -> Tensor:
        mean = self.query_sum / max(self.query_count, 1)
        return self.query_covariance - mean[:, :, None] * mean[:, None, :]


def value_metric_from_o_proj(model, layer_index: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """sum over the group's query heads of W_o,h^T W_o,h [Hkv, D, D] (how value errors reach the residual)."""
    attn = model.model.layers[layer_index].self_attn
    w = attn.o_proj.weight.detach().float()  # [hidden, Hq*D]
    hq = w.shape[1] // head_dim
    per_head = w.reshape(w.shape[0], hq, head_dim).permute(1, 2, 0)  # [Hq, D, hidden]
    gram = per_head @ per_head.transpose(1, 2)  # [Hq, D, D]
    return gram.reshape(num_kv_heads, hq // num_kv_heads, head_dim, head_dim).sum(1)


@torch.no_grad()
def collect_statistics(model, contexts: Tensor, *, progress: bool = True, key_space: str = "post_rope") -> list[LayerStatistics]:
    """Run every context [n, L] through the model with exact attention and gather statistics.

    key_space "pre_rope" records keys unrotated by their positions (for pre-RoPE codebooks)."""
    rope = RopeTable.from_model(model) if key_space == "pre_rope" else None
    geom = kv_geometry(model.config)
    stats = [LayerStatistics() for _ in range(geom.num_layers)]
    for i, s in enumerate(stats):
        s.value_metric = value_metric_from_o_proj(model, i, geom.num_kv_heads, geom.head_dim)

    def handler(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        t = q.shape[2]
        pos = torch.arange(t, device=q.device)
        mask = causal_mask(pos, pos)
        out, lse = exact_attention(q, k, v, scale, mask)
        wk, wv = weights_for_calibration(q, k, v, out, lse, scale, mask)
        st = stats[layer]
        if rope is not None:
            k = unrotate(k.float(), *rope(pos))
        st.keys.append(k.float().transpose(0, 1).flatten(1, 2).clone())
        st.values.append(v.float().transpose(0, 1).flatten(1, 2).clone())
        st.w_key.append(wk.transpose(0, 1).flatten(1))
        st.w_value.append(wv.transpose(0, 1).flatten(1))
        qg = group_queries(q.float(), k.shape[1])  # [B, H, G, T, D]
        outer = torch.einsum("bhgtd,bhgte->hde", qg, qg)
        st.query_outer = outer if st.query_outer is None else st.query_outer + outer
        qsum = qg.sum((0, 2, 3))
        st.query_sum = qsum if st.query_sum is None else st.query_sum + qsum
        st.query_count += qg.shape[0] * qg.shape[2] * qg.shape[3]
        return out.to(q.dtype)

    with routed(model, handler):
        for row in tqdm(contexts, desc="calibration forward", disable=None if progress else True, unit="ctx"):
            chunk_logits(model, row[None], 0)
    return stats


def model_identity(model, model_id: str) -> dict:
    """The manifest's ``model``: name, architecture, KV geometry, RoPE frequencies and a weight fingerprint
    (shape and norm of each parameter), which the backend compares with the graph it compiles."""
    from .model_facts import weight_fingerprint

    g = kv_geometry(model.config)
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rot, "inv_freq", None)
    return {
        "weights": weight_fingerprint(model.parameters()),
        **({"rope_inv_freq": [float(x) for x in inv_freq.float().cpu()]} if inv_freq is not None else {}),
        "id": model_id,
        "architecture": type(model).__name__,
        "num_layers": g.num_layers,
        "num_q_heads": g.num_q_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
    }


def learn_artifact(
    stats: list[LayerStatistics],
    preset: VQPreset,
    *,
    options: LearningOptions = LearningOptions(),
    value_options: LearningOptions | None = None,
    model_info: dict,
    text_info: dict,
    seed: int = 0,
    progress: bool = True,
    key_space: str = "post_rope",
    rope: tuple[Tensor, float] | None = None,
) -> CodebookArtifact:
    """Fit key and value codebooks for every layer."""
    value_options = value_options or options
    if key_space == "pre_rope" and options.pairs is None:  # pre-RoPE keys are always in the RoPE-pair layout
        options = dataclasses.replace(options, pairs=DEFAULT_PAIR_GROUPING)
    gen = torch.Generator().manual_seed(seed)
    keys, values = [], []
    t0 = time.time()
    for st in tqdm(stats, desc=f"k-means {preset.name}-bit", disable=None if progress else True, unit="layer"):
        k, v, wk, wv = st.cat()
        key_metric = st.query_covariance_centered if options.metric_center else st.query_covariance
        keys.append(learn_codebook(k, wk, preset, metric=key_metric, options=options, generator=gen))
        values.append(learn_codebook(v, wv, preset, metric=st.value_metric, options=value_options, generator=gen))
    manifest = {
        "model": model_info,
        "preset": dataclasses.asdict(preset) | {"nominal_bits": preset.nominal_bits},
        "key_options": dataclasses.asdict(options),
        "value_options": dataclasses.asdict(value_options),
        "key_space": key_space,
        **({"rope": {"attention_scaling": rope[1]}} if rope is not None else {}),
        "calibration": text_info | {"seconds_kmeans": round(time.time() - t0, 1)},
        "seed": seed,
    }
    if key_space == "pre_rope" and rope is None:
        raise ValueError("pre-RoPE codebooks need the model's RoPE parameters: rope=model_rope_parameters(model)")
    return CodebookArtifact(keys, values, manifest, rope[0] if key_space == "pre_rope" else None)


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_calibrate(model, tokenizer, directory, *, bits: str = "1", key_space: str = "pre_rope",
                      tokens: int = 2048, context_len: int = 1024, iters: int | None = None,
                      model_id: str | None = None, progress: bool = True, seed: int = 0) -> CodebookArtifact:
    """The codebook artifact in ``directory``; when there is none (or it cannot be read), calibrate one on
    ``tokens`` tokens of the calibration text (Python's pydoc topics), save it there and return it.

    ``iters``: k-means iterations (None: the recipe's default). ``model_id``: the name written in the manifest
    (default: the config's ``name_or_path`` or the model class)."""
    from pathlib import Path

    from .artifact import ArtifactError, load_artifact
    from .config import get_preset
    from .eval_suite import Recipe
    from .numerics.rope import model_rope_parameters
    from .texts import calibration_text, token_contexts

    path = Path(directory)
    try:
        return load_artifact(path)
    except ArtifactError:
        pass
    recipe = Recipe(bits, key_space=key_space)
    key_opts, value_opts = recipe.key_options, recipe.value_options
    if iters is not None:
        key_opts, value_opts = (dataclasses.replace(o, iters=iters) for o in (key_opts, value_opts))
    context_len = min(context_len, tokens, getattr(model.config, "max_position_embeddings", None) or context_len)
    text = calibration_text()
    ctx = token_contexts(tokenizer, text, context_len, num_contexts=max(1, tokens // context_len))
    device = next(model.parameters()).device
    stats = collect_statistics(model, ctx.to(device), progress=progress, key_space=key_space)
    name = model_id or getattr(model.config, "name_or_path", "") or type(model).__name__
    art = learn_artifact(stats, get_preset(bits), options=key_opts, value_options=value_opts,
                         model_info=model_identity(model, name), key_space=key_space,
                         rope=model_rope_parameters(model) if key_space == "pre_rope" else None,
                         text_info={"text": "calibration", "sha256_16": text_fingerprint(text), "tokens": int(ctx.numel()),
                                    "context_len": int(ctx.shape[1])},
                         seed=seed, progress=progress)
    art.save(path)
    return art
