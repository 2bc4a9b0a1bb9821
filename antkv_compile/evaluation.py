"""Perplexity harness: every method through one decode-path protocol.

Protocol. Each evaluation context (L tokens, BOS first) is processed in chunks of ``flush``
tokens (default window / 2 = 32). Every chunk attends exactly to itself (causally), to the
full-precision window and to the coded store of everything older; then its tokens enter the
window, which is then full, and the oldest ``flush`` window tokens are flushed (scored over the
queries seen since they arrived, anchors promoted, the rest encoded). This is exactly what
token-by-token decoding through the store computes (a decode token sees the coded past, the
anchors and the full-precision window), at prefill speed. Perplexity is
exp(mean NLL) over all L-1 next-token predictions of every context. The full-precision baseline
runs the same chunks over an exact cache.

Retrieval-mode methods (``offload="host"``) retrieve per query token, as decoding does; their effective bits count
the device (codes, anchors, window), not the full-precision copy in host memory nor the transient retrieved tokens.

Effective bits per KV element = (codes + anchors with their positions + a full window, at the end
of a context) / (K and V elements of the context) + codebooks and coding-space maps (fp16)
amortized over all evaluated tokens.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .artifact import CodebookArtifact
from .config import AnTKVConfig
from .hf_routing import chunk_logits, routed
from .models import kv_geometry
from .numerics.rope import RopeTable
from .numerics.scalar_quant import ScalarQuantizer
from .numerics.store import FULL_PRECISION_BITS, AnTKVLayerStore, ExactLayerStore, ScalarLayerStore, StoreGeometry


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of the results table."""

    name: str
    family: str  # "full" | "antkv" | "kivi"
    config: AnTKVConfig = AnTKVConfig()  # antkv: bits, anchors, window; kivi/full: window
    artifact: str | None = None  # key into the artifacts mapping (antkv)
    scalar_bits: int = 2  # kivi

    @property
    def nominal_bits(self) -> float:
        if self.family == "full":
            return 16.0
        if self.family == "kivi":
            return float(self.scalar_bits)
        return self.config.preset.nominal_bits


@dataclasses.dataclass
class MethodResult:
    name: str
    nominal_bits: float
    effective_bits: float
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    memory: dict[str, float]  # bits per KV element by component

    def row(self, baseline: float | None = None) -> dict:
        d = dataclasses.asdict(self)
        if baseline:
            d["ratio_to_full"] = self.perplexity / baseline
        return d


def _stores(spec: MethodSpec, geom_kv, geometry: StoreGeometry, artifacts: dict[str, CodebookArtifact], model=None):
    if spec.family == "full":
        return [ExactLayerStore(geometry) for _ in range(geom_kv.num_layers)]
    if spec.family == "kivi":
        q = ScalarQuantizer(spec.scalar_bits)
        return [ScalarLayerStore(geometry, q, spec.config.window, spec.config.flush_size)
                for _ in range(geom_kv.num_layers)]
    if spec.family == "antkv":
        art = artifacts[spec.artifact]
        art.check_preset(spec.config.bits)
        art.check_model(geom_kv)
        if art.manifest.get("key_space", "post_rope") != spec.config.key_space:
            raise ValueError(f"artifact {spec.artifact!r} codes keys {art.manifest.get('key_space')}, the method "
                             f"asks for {spec.config.key_space}")
        rope = RopeTable.from_model(model) if spec.config.key_space == "pre_rope" else None
        cls = AnTKVLayerStore
        if spec.config.offload == "host":  # the retrieval mode: top-k coded tokens read exactly from a full copy
            from .numerics.retrieval import RetrievalLayerStore as cls
        return [
            cls(geometry, art.keys[i], art.values[i], spec.config, layer_index=i, rope=rope)
            for i in range(geom_kv.num_layers)
        ]
    raise ValueError(f"unknown method family {spec.family!r}")


@torch.no_grad()
def evaluate_method(
    model,
    contexts: Tensor,
    spec: MethodSpec,
    artifacts: dict[str, CodebookArtifact] | None = None,
    *,
    batch_size: int = 4,
    progress: bool = True,
    total_eval_tokens: int | None = None,
    prefill: int = 0,
) -> MethodResult:
    """Perplexity of ``model`` over ``contexts`` [n, L] with the KV cache of ``spec``.

    ``prefill`` > 0: the first ``prefill`` tokens of each context are one chunk (a long prompt, scored by its
    own queries at its flush), the rest go in chunks of ``flush`` as usual, and the perplexity counts only the
    predictions after the prompt (those that read its coded tokens)."""
    artifacts = artifacts or {}
    geom_kv = kv_geometry(model.config)
    param = next(model.parameters())
    n, length = contexts.shape
    window = spec.config.window
    chunk = spec.config.flush_size  # chunk = flush keeps the window <= `window`, exactly as in decoding
    nll, count = 0.0, 0
    bits = {"codes": 0.0, "anchors": 0.0, "window": 0.0}
    t0 = time.time()
    if not 0 <= prefill < length - 1:
        raise ValueError(f"prefill must leave tokens to predict: 0 <= prefill < {length - 1} (context length {length})")
    bounds = list(range(0, length, chunk)) if not prefill else [0, *range(prefill, length, chunk)]
    steps = len(bounds) * math.ceil(n / batch_size)
    bar = tqdm(total=steps, desc=spec.name, disable=None if progress else True, unit="chunk", leave=False)
    for b0 in range(0, n, batch_size):
        ids = contexts[b0:b0 + batch_size].to(param.device)
        b = ids.shape[0]
        geometry = StoreGeometry(b, geom_kv.num_kv_heads, geom_kv.head_dim, length, param.dtype, param.device,
                                 scale=_scaling(model))
        stores = _stores(spec, geom_kv, geometry, artifacts, model)

        def handler(layer, q, k, v, scale, stores=stores):
            return stores[layer].attend(q, k, v, check_finite=False)

        with routed(model, handler):
            for i, s in enumerate(bounds):
                e = bounds[i + 1] if i + 1 < len(bounds) else length
                logits = chunk_logits(model, ids[:, s:e], s).float()
                targets = ids[:, s + 1:e + 1]
                logits = logits[:, : targets.shape[1]]
                if prefill and s == 0:
                    bar.update(1)
                    continue
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
                bar.update(1)
        full_window = 2 * window * b * geom_kv.num_kv_heads * geom_kv.head_dim * FULL_PRECISION_BITS * geom_kv.num_layers
        for st in stores:
            for key, val in st.memory_bits().items():
                if key != "window" or spec.family == "full":
                    bits[key] += val
        if spec.family != "full":
            bits["window"] += full_window  # the window counted full (its worst case), whatever it held at the end
    bar.close()
    elements = n * length * geom_kv.num_layers * geom_kv.num_kv_heads * geom_kv.head_dim * 2
    memory = {k: v / elements for k, v in bits.items()}
    if spec.family == "full":
        memory = {"full": 16.0}
    if spec.family == "antkv":
        total = (total_eval_tokens or n * length) * geom_kv.num_layers * geom_kv.num_kv_heads * geom_kv.head_dim * 2
        memory["codebooks"] = artifacts[spec.artifact].storage_bits() / total
    mean_nll = nll / count
    return MethodResult(
        name=spec.name,
        nominal_bits=spec.nominal_bits,
        effective_bits=sum(memory.values()),
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        tokens=count,
        seconds=time.time() - t0,
        memory=memory,
    )


def _scaling(model) -> float:
    attn = model.model.layers[0].self_attn
    return float(getattr(attn, "scaling", kv_geometry(model.config).head_dim ** -0.5))
