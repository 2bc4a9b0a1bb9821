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

import torch

from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
from antkv_compile.config import AnTKVConfig, VQPreset, get_preset
from antkv_compile.evaluation import MethodSpec, evaluate_method
from antkv_compile.models import load_model
from antkv_compile.numerics.codebook_learning import LearningOptions
from antkv_compile.numerics.rope import model_rope_parameters
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
VARIANTS: dict[str, tuple[VQPreset | str, LearningOptions, LearningOptions, dict]] = {
    "1:post-rope": ("1", *VM, {}),
    "1:pre-rope": ("1", *VM, PRE),
    "4:pre-rope": ("4", *VM, PRE),
    "2:pre-rope": ("2", *VM, PRE),
    "0.375:pre-rope": ("0.375", *VM, PRE),
}
KIVI: dict[str, int] = {}  # round 3 measured kivi-2 and kivi-4


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
    ap.add_argument("--out", default="benchmarks/results/dev_tuning.json")
    args = ap.parse_args()
    torch.manual_seed(0)
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
    stats = collect_statistics(model, cctx.to(args.device))
    print(f"statistics over {cctx.numel()} calibration tokens in {time.time() - t0:.0f}s", flush=True)
    pre_stats = None
    if any(o.get("key_space") == "pre_rope" for *_, o in variants.values()):
        pre_stats = collect_statistics(model, cctx.to(args.device), progress=False, key_space="pre_rope")
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
    for vname, (preset, kopts, vopts, over) in variants.items():
        t1 = time.time()
        space = over.get("key_space", "post_rope")
        key = (str(preset), kopts, vopts, space)
        if key not in fitted:
            src = pre_stats if space == "pre_rope" else (big if vname.endswith("-64k") else stats)
            fitted[key] = learn_artifact(src, get_preset(preset), options=kopts, value_options=vopts, model_info=info,
                                         text_info={}, progress=False, key_space=space,
                                         rope=model_rope_parameters(model) if space == "pre_rope" else None)
        fit_s = time.time() - t1
        cfg = AnTKVConfig(bits=get_preset(preset), coded_path="dequantized", **over)
        r = evaluate_method(model, dctx, MethodSpec(vname, "antkv", cfg, "a"), {"a": fitted[key]},
                            batch_size=4, progress=False)
        rows.append(r.row(full.perplexity) | {"variant": vname, "anchors": cfg.score, "fit_seconds": fit_s})
        print(f"{vname:28s} ppl {r.perplexity:8.3f} x{r.perplexity / full.perplexity:.3f} "
              f"eff {r.effective_bits:.3f}", flush=True)
    cols = [("variant", "variant", "s"), ("anchors", "anchors", "s"), ("perplexity", "dev ppl", ".3f"),
            ("ratio_to_full", "x full", ".3f"), ("effective_bits", "eff. bits", ".3f")]
    table = markdown_table(rows, cols)
    print(table)
    write_json(args.out, {"environment": environment(), "protocol": {
        "calibration": f"pydoc topics, first 80% of sorted names, {cctx.numel()} tokens",
        "dev": f"pydoc topics, last 20%, {dctx.shape[0]} x {dctx.shape[1]} tokens", "window": 64, "anchor_ratio": 0.01,
        "round": 5},
        "results": rows, "markdown": table,
        "variants": {k: [str(p), dataclasses.asdict(ko), dataclasses.asdict(vo), o] for k, (p, ko, vo, o) in variants.items()}})


if __name__ == "__main__":
    main()
