"""The named methods of the perplexity table and the codebook recipes they need.

Every AnTKV-family method names an artifact *recipe* (preset + learning options); the harness
calibrates each recipe once on the calibration text and caches it as an artifact directory.
"""
from __future__ import annotations

import dataclasses

from .config import PRESETS, AnTKVConfig
from .evaluation import MethodSpec
from .numerics.codebook_learning import DEFAULT_PAIR_GROUPING, LearningOptions


@dataclasses.dataclass(frozen=True)
class Recipe:
    bits: str
    key_options: LearningOptions | None = None  # None: the default for key_space (below)
    value_options: LearningOptions = LearningOptions()
    key_space: str = "post_rope"

    def __post_init__(self) -> None:
        if self.key_options is None:  # pre-RoPE keys: RoPE-pair sub-spaces (decodable in-kernel)
            pairs = DEFAULT_PAIR_GROUPING if self.key_space == "pre_rope" else None
            object.__setattr__(self, "key_options", LearningOptions(metric=False, pairs=pairs))


# Defaults chosen on the dev split (benchmarks/results/dev_tuning_round*.json): keys weighted and
# rotated to principal axes with balanced sub-spaces but *no* query metric (it made 1-bit 3.6x worse
# on dev); values weighted, rotated, with the W_o metric.
_NO_FRILLS = LearningOptions(weighted=False, metric=False, rotate=False)
RECIPES: dict[str, Recipe] = {
    **{f"antkv-{b}": Recipe(b) for b in PRESETS},
    # CQ-style plain VQ: unweighted k-means on raw vectors
    "plain-1": Recipe("1", _NO_FRILLS, _NO_FRILLS),
    # ablations of the 1-bit recipe
    "unweighted-1": Recipe("1", LearningOptions(metric=False, weighted=False), LearningOptions(weighted=False)),
    "key-metric-1": Recipe("1", LearningOptions(), LearningOptions()),
    "no-rotate-1": Recipe("1", LearningOptions(metric=False, rotate=False), LearningOptions(rotate=False)),
    "shared-1": Recipe("1", LearningOptions(metric=False, shared=True), LearningOptions(shared=True)),
    "pre-rope-1": Recipe("1", key_space="pre_rope"),
    **{f"antkv-pre-rope-{b}": Recipe(b, key_space="pre_rope") for b in PRESETS},
}


def _antkv(name: str, recipe: str, **cfg) -> MethodSpec:
    return MethodSpec(name, "antkv", AnTKVConfig(bits=RECIPES[recipe].bits, **cfg), recipe)


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full"),
    **{f"antkv-{b}": _antkv(f"antkv-{b}", f"antkv-{b}") for b in PRESETS},
    "kivi-2": MethodSpec("kivi-2", "kivi", scalar_bits=2),
    "kivi-1": MethodSpec("kivi-1", "kivi", scalar_bits=1),
    "plain-vq-1": _antkv("plain-vq-1", "plain-1", score="none"),
    # anchor criterion ablations on the AnTKV 1-bit codebooks
    "anchors-attention-1": _antkv("anchors-attention-1", "antkv-1", score="attention"),
    "anchors-random-1": _antkv("anchors-random-1", "antkv-1", score="random"),
    "anchors-sensitivity-1": _antkv("anchors-sensitivity-1", "antkv-1", score="sensitivity"),
    "anchors-none-1": _antkv("anchors-none-1", "antkv-1", score="none"),
    # codebook ablations (AnS anchors)
    "kmeans-unweighted-1": _antkv("kmeans-unweighted-1", "unweighted-1"),
    "key-metric-1": _antkv("key-metric-1", "key-metric-1"),
    "no-rotate-1": _antkv("no-rotate-1", "no-rotate-1"),
    "shared-codebooks-1": _antkv("shared-codebooks-1", "shared-1"),
    "pre-rope-keys-1": _antkv("pre-rope-keys-1", "pre-rope-1", key_space="pre_rope", coded_path="dequantized"),
    **{f"antkv-pre-rope-{b}": _antkv(f"antkv-pre-rope-{b}", f"antkv-pre-rope-{b}", key_space="pre_rope",
                                      coded_path="dequantized") for b in PRESETS},
}

MAIN = ["full", "antkv-4", "antkv-2", "antkv-1", "antkv-0.75", "antkv-0.375", "kivi-2", "kivi-1", "plain-vq-1",
        "anchors-attention-1", "anchors-random-1"]
ABLATIONS = ["anchors-sensitivity-1", "anchors-none-1", "kmeans-unweighted-1", "key-metric-1", "no-rotate-1",
             "shared-codebooks-1", "pre-rope-keys-1"]
QUICK = ["full", "antkv-pre-rope-1", "kivi-2"]  # the demo's recipe: `eval --quick` reuses its codebooks
PRE_ROPE = ["full", *[f"antkv-pre-rope-{b}" for b in PRESETS]]


def resolve(names: list[str], **overrides) -> list[MethodSpec]:
    """Method specs by name, with AnTKVConfig field overrides (e.g. window, anchor_ratio)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    out = []
    for n in names:
        spec = METHODS[n]
        if overrides:
            spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, **overrides))
        out.append(spec)
    return out
