"""Design decisions, measured on a *development* split of the calibration documents.

Never tunes on the evaluation text: the pydoc topics (sorted by name) are split 80/20; codebooks
are learned on the first 80% and every variant is scored on the last 20%. The license texts used
for the reported table are not read here.

    python benchmarks/tune_on_dev.py --device cuda --out benchmarks/results/dev_tuning.json

Variants: codebook recipes (weighting, weight clipping, metric, rotation, sharing, residual VQ
shapes, calibration size) x anchor criteria, at 1 and 0.375 bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
from antkv_compile.artifact import CodebookArtifact
from antkv_compile.config import PRESETS, AnTKVConfig, VQPreset, get_preset
from antkv_compile.evaluation import MethodSpec, evaluate_method
from antkv_compile.models import load_model
from antkv_compile.numerics.codebook_learning import PAIR_GROUPINGS, LearningOptions, learn_codebook
from antkv_compile.numerics.rope import RopeTable, model_rope_parameters, rotate
from antkv_compile.reporting import environment, markdown_table, write_json
from antkv_compile.texts import token_contexts

RVQ_1 = VQPreset("1-rvq16x2", sub_dim=16, code_bits=8, stages=2)
RVQ_0375 = VQPreset("0.375-rvq32x2", sub_dim=32, code_bits=6, stages=2)
PQ_0375_32 = VQPreset("0.375-pq32", sub_dim=32, code_bits=12)  # 4096 centroids: GPU only

NM = LearningOptions(metric=False)  # round 1: the key metric hurts; weighted + rotated wins
VM = (NM, LearningOptions())  # round 2: no key metric, W_o metric for values (1.612 vs 1.636 on dev)

# name: (preset, key options, value options, AnTKVConfig overrides). Rounds 1 and 2 (metric, weighting,
# clipping, rotation, sharing, RVQ, calibration size) are in benchmarks/results/dev_tuning_round{1,2}.json;
# round 3 (this list) measures the sliding window (flush the oldest half, keep the newest exact).
VARIANTS_ROUND3: dict[str, tuple[VQPreset | str, LearningOptions, LearningOptions, dict]] = {
    "1:vm/flush64": ("1", *VM, {"flush": 64}),
    "1:vm/flush32": ("1", *VM, {}),
    "1:vm/flush16": ("1", *VM, {"flush": 16}),
    "1:vm/flush32/no-anchors": ("1", *VM, {"score": "none"}),
    "1:vm/flush32/attention-anchors": ("1", *VM, {"score": "attention"}),
    "1:no-metric/flush32": ("1", NM, NM, {}),
    "4:vm/flush32": ("4", *VM, {}),
    "2:vm/flush32": ("2", *VM, {}),
    "0.75:vm/flush32": ("0.75", *VM, {}),
    "0.375:vm/flush32": ("0.375", *VM, {}),
    "0.375:pq32-vm/flush32": (PQ_0375_32, *VM, {}),
}
# round 4: the 4- and 2-bit presets (4:vm/flush32 was 1.062x on dev, 2-bit 1.125x)
UW = (LearningOptions(metric=False, weighted=False), LearningOptions(weighted=False))
VARIANTS_ROUND4: dict[str, tuple[VQPreset | str, LearningOptions, LearningOptions, dict]] = {
    "4:pq2": ("4", *VM, {}),
    "4:pq2-unweighted": ("4", *UW, {}),
    "4:rvq4x2": (VQPreset("4-rvq4x2", 4, 8, 2), *VM, {}),
    "4:rvq8x4": (VQPreset("4-rvq8x4", 8, 8, 4), *VM, {}),
    "2:pq4": ("2", *VM, {}),
    "2:pq4-unweighted": ("2", *UW, {}),
    "2:rvq8x2": (VQPreset("2-rvq8x2", 8, 8, 2), *VM, {}),
}
# round 5: keys coded before RoPE (unrotated by position, rotated back after decoding)
PRE = {"key_space": "pre_rope"}
VARIANTS_ROUND5: dict[str, tuple[VQPreset | str, LearningOptions, LearningOptions, dict]] = {
    "1:post-rope": ("1", *VM, {}),
    "1:pre-rope": ("1", *VM, PRE),
    "4:pre-rope": ("4", *VM, PRE),
    "2:pre-rope": ("2", *VM, PRE),
    "0.375:pre-rope": ("0.375", *VM, PRE),
}
# round 6: pre-RoPE keys in RoPE-pair sub-spaces (decodable in-kernel), per pair grouping, against the old dense
# principal-axes pre-RoPE map ("pre-rope-dense": keys pre-RoPE, pairs=None) and post-RoPE keys
VARIANTS: dict[str, tuple[VQPreset | str, LearningOptions, LearningOptions, dict]] = {
    **{f"{b}:post-rope": (b, *VM, {}) for b in PRESETS},
    **{f"{b}:pre-rope-dense": (b, *VM, PRE) for b in PRESETS},
    **{f"{b}:pairs-{g}": (b, LearningOptions(metric=False, pairs=g), VM[1], PRE) for b in PRESETS for g in PAIR_GROUPINGS},
}
KIVI: dict[str, int] = {}  # round 3 measured kivi-2 and kivi-4


def post_rope_from_pre(pre_stats, rope: RopeTable):
    """Post-RoPE statistics from pre-RoPE ones (keys rotated back by position; one calibration forward for both)."""
    out = []
    for st in pre_stats:
        post = dataclasses.replace(st, keys=[])
        for k in st.keys:  # [H, T, D] per calibration context, positions 0 .. T-1
            post.keys.append(rotate(k[None], *rope(torch.arange(k.shape[1], device=k.device)))[0])
        out.append(post)
    return out


def fit(stats, preset: VQPreset, kopts: LearningOptions, vopts: LearningOptions, space: str, model, info, iters: int,
        values_cache: dict) -> CodebookArtifact:
    """Keys per variant, values shared by every variant with the same preset and value options (same seed).
    Pre-RoPE keys with kopts.pairs None give the old dense principal-axes map (learn_artifact no longer builds it)."""
    kopts, vopts = dataclasses.replace(kopts, iters=iters), dataclasses.replace(vopts, iters=iters)
    gen = torch.Generator().manual_seed(0)
    keys = []
    for st in stats:
        k, _, wk, _ = st.cat()
        keys.append(learn_codebook(k, wk, preset, metric=st.query_covariance, options=kopts, generator=gen))
    vkey = (preset, vopts)
    if vkey not in values_cache:
        vgen = torch.Generator().manual_seed(1)
        values_cache[vkey] = [learn_codebook(torch.cat(st.values, 1), torch.cat(st.w_value, 1), preset,
                                             metric=st.value_metric, options=vopts, generator=vgen) for st in stats]
    manifest = {"model": info, "preset": dataclasses.asdict(preset) | {"nominal_bits": preset.nominal_bits},
                "key_options": dataclasses.asdict(kopts), "value_options": dataclasses.asdict(vopts), "key_space": space}
    inv_freq, scaling = model_rope_parameters(model)
    if space == "pre_rope":
        manifest["rope"] = {"attention_scaling": scaling}
    return CodebookArtifact(keys, values_cache[vkey], manifest, inv_freq if space == "pre_rope" else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--calib-context-len", type=int, default=1024)
    ap.add_argument("--context-len", type=int, default=4096)
    ap.add_argument("--dev-tokens", type=int, default=16384)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-tokens-big", type=int, default=65536, help="calibration tokens of the *-64k variants")
    ap.add_argument("--iters", type=int, default=20, help="k-means iterations (keys and values)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--stats-cache", default=None, help="file to save / reuse the calibration statistics (same args)")
    ap.add_argument("--out", default="benchmarks/results/dev_tuning.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}

    model, tok = load_model(args.model, device=args.device)
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * 0.8)
    calib = "\n\n".join(topics[k].strip() for k in names[:cut])
    dev = "\n\n".join(topics[k].strip() for k in names[cut:])
    cctx = token_contexts(tok, calib, args.calib_context_len, num_contexts=args.calib_tokens // args.calib_context_len)
    dctx = token_contexts(tok, dev, args.context_len, num_contexts=max(1, args.dev_tokens // args.context_len))
    t0 = time.time()
    if args.stats_cache and Path(args.stats_cache).is_file():
        pre_stats = torch.load(args.stats_cache, weights_only=False)
    else:
        pre_stats = collect_statistics(model, cctx.to(args.device), progress=False, key_space="pre_rope")
        if args.stats_cache:
            torch.save(pre_stats, args.stats_cache)
    stats = post_rope_from_pre(pre_stats, RopeTable.from_model(model))
    print(f"statistics over {cctx.numel()} calibration tokens in {time.time() - t0:.0f}s", flush=True)
    big = None
    if any(k.endswith("-64k") for k in variants):
        bctx = token_contexts(tok, calib, args.calib_context_len,
                              num_contexts=args.calib_tokens_big // args.calib_context_len)
        big = collect_statistics(model, bctx.to(args.device), progress=False)
    info = model_identity(model, args.model)

    rows = []
    full = evaluate_method(model, dctx, MethodSpec("full", "full"), batch_size=4)
    rows.append(full.row(full.perplexity) | {"variant": "full", "anchors": "-"})
    print(f"full: {full.perplexity:.3f}", flush=True)
    for kname, bits in KIVI.items():
        r = evaluate_method(model, dctx, MethodSpec(kname, "kivi", scalar_bits=bits), batch_size=4, progress=False)
        rows.append(r.row(full.perplexity) | {"variant": kname, "anchors": "-"})
        print(f"{kname:28s} ppl {r.perplexity:8.3f} x{r.perplexity / full.perplexity:.3f} eff {r.effective_bits:.3f}", flush=True)
    fitted: dict = {}
    values_cache: dict = {}
    for vname, (preset, kopts, vopts, over) in variants.items():
        t1 = time.time()
        space = over.get("key_space", "post_rope")
        key = (str(preset), kopts, vopts, space)
        if key not in fitted:
            src = pre_stats if space == "pre_rope" else (big if vname.endswith("-64k") else stats)
            fitted[key] = fit(src, get_preset(preset), kopts, vopts, space, model, info, args.iters, values_cache)
        fit_s = time.time() - t1
        cfg = AnTKVConfig(bits=get_preset(preset), coded_path="dequantized", **over)
        r = evaluate_method(model, dctx, MethodSpec(vname, "antkv", cfg, "a"), {"a": fitted[key]},
                            batch_size=4, progress=False)
        rows.append(r.row(full.perplexity) | {"variant": vname, "anchors": cfg.score, "fit_seconds": fit_s})
        print(f"{vname:28s} ppl {r.perplexity:8.3f} x{r.perplexity / full.perplexity:.3f} "
              f"eff {r.effective_bits:.3f} fit {fit_s:.0f}s eval {r.seconds:.0f}s", flush=True)
        save(args, rows, variants, cctx, dctx)
    table = save(args, rows, variants, cctx, dctx)
    print(table)


def save(args, rows, variants, cctx, dctx) -> str:
    """Write the results so far (after every variant: a long CPU run keeps what it measured)."""
    cols = [("variant", "variant", "s"), ("anchors", "anchors", "s"), ("perplexity", "dev ppl", ".3f"),
            ("ratio_to_full", "x full", ".3f"), ("effective_bits", "eff. bits", ".3f")]
    table = markdown_table(rows, cols)
    write_json(args.out, {"environment": environment(), "protocol": {
        "calibration": f"pydoc topics, first 80% of sorted names, {cctx.numel()} tokens",
        "dev": f"pydoc topics, last 20%, {dctx.shape[0]} x {dctx.shape[1]} tokens", "window": 64, "anchor_ratio": 0.01,
        "kmeans_iters": args.iters, "values": "one value codebook per preset, shared by every variant",
        "round": 6},
        "results": rows, "markdown": table,
        "variants": {k: [str(p), dataclasses.asdict(ko), dataclasses.asdict(vo), o] for k, (p, ko, vo, o) in variants.items()}})
    return table


if __name__ == "__main__":
    main()
