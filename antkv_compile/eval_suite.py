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


# The default recipe (chosen on the dev split, benchmarks/results/dev_tuning_round*.json): keys coded *before*
# RoPE in RoPE-pair sub-spaces (decodable in-kernel, round 6), sensitivity-weighted k-means; values weighted,
# rotated to principal axes with balanced sub-spaces and the W_o metric. The post-RoPE recipes (keys as the
# model caches them, rotated to principal axes, no query metric: it made 1-bit 3.6x worse on dev) are ablations.
_NO_FRILLS = LearningOptions(weighted=False, metric=False, rotate=False)
RECIPES: dict[str, Recipe] = {
    **{f"antkv-{b}": Recipe(b, key_space="pre_rope") for b in PRESETS},
    **{f"post-rope-{b}": Recipe(b) for b in PRESETS},
    # CQ-style plain VQ: unweighted k-means on raw (post-RoPE) vectors
    "plain-1": Recipe("1", _NO_FRILLS, _NO_FRILLS),
    # ablations of the post-RoPE 1-bit recipe's coding map
    "unweighted-1": Recipe("1", LearningOptions(metric=False, weighted=False), LearningOptions(weighted=False)),
    "key-metric-1": Recipe("1", LearningOptions(), LearningOptions()),
    "no-rotate-1": Recipe("1", LearningOptions(metric=False, rotate=False), LearningOptions(rotate=False)),
    "shared-1": Recipe("1", LearningOptions(metric=False, shared=True), LearningOptions(shared=True)),
}


def _antkv(name: str, recipe: str, **cfg) -> MethodSpec:
    r = RECIPES[recipe]
    if r.key_space == "pre_rope":  # the harness attends with dense matmuls over codes decoded on the fly
        cfg = {"key_space": "pre_rope", "coded_path": "dequantized", **cfg}
    return MethodSpec(name, "antkv", AnTKVConfig(bits=r.bits, **cfg), recipe)


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", "full"),
    **{f"antkv-{b}": _antkv(f"antkv-{b}", f"antkv-{b}") for b in PRESETS},
    **{f"post-rope-{b}": _antkv(f"post-rope-{b}", f"post-rope-{b}") for b in PRESETS},
    "kivi-2": MethodSpec("kivi-2", "kivi", scalar_bits=2),
    "kivi-1": MethodSpec("kivi-1", "kivi", scalar_bits=1),
    "plain-vq-1": _antkv("plain-vq-1", "plain-1", score="none"),
    # anchor criterion ablations on the default 1-bit codebooks
    "anchors-attention-1": _antkv("anchors-attention-1", "antkv-1", score="attention"),
    "anchors-random-1": _antkv("anchors-random-1", "antkv-1", score="random"),
    "anchors-sensitivity-1": _antkv("anchors-sensitivity-1", "antkv-1", score="sensitivity"),
    "anchors-none-1": _antkv("anchors-none-1", "antkv-1", score="none"),
    # codebook ablations (post-RoPE keys, AnS anchors)
    "kmeans-unweighted-1": _antkv("kmeans-unweighted-1", "unweighted-1"),
    "key-metric-1": _antkv("key-metric-1", "key-metric-1"),
    "no-rotate-1": _antkv("no-rotate-1", "no-rotate-1"),
    "shared-codebooks-1": _antkv("shared-codebooks-1", "shared-1"),
}

# the retrieval mode (offload="host", issue 19): the default 1-bit recipe as an index over full-precision K/V. The
# default method retrieves 2 % (at least 64 tokens); the sweep retrieves exactly the named percentage (no floor, so
# that short contexts show the fraction's own effect)
RETRIEVE_SWEEP_PERCENT = ("0.5", "1", "2", "5")
METHODS["antkv-1-retrieve"] = _antkv("antkv-1-retrieve", "antkv-1", offload="host")
for _pct in RETRIEVE_SWEEP_PERCENT:
    METHODS[f"antkv-1-retrieve-{_pct}"] = _antkv(f"antkv-1-retrieve-{_pct}", "antkv-1", offload="host",
                                                 retrieve_fraction=float(_pct) / 100, retrieve_min=0)
RETRIEVE = ["full", "antkv-1", "antkv-1-retrieve", *[f"antkv-1-retrieve-{p}" for p in RETRIEVE_SWEEP_PERCENT]]

MAIN = ["full", *[f"antkv-{b}" for b in PRESETS], "kivi-2", "kivi-1", "plain-vq-1", "anchors-attention-1",
        "anchors-random-1", "anchors-none-1"]
ABLATIONS = [*[f"post-rope-{b}" for b in PRESETS], "anchors-sensitivity-1", "kmeans-unweighted-1", "key-metric-1",
             "no-rotate-1", "shared-codebooks-1"]
QUICK = ["full", "antkv-1", "kivi-2"]  # the demo's recipe: `eval --quick` reuses its codebooks


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
