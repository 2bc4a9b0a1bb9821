"""How much row sampling of the Anchor Score changes which tokens become anchors, on the real model.

    python benchmarks/score_sampling_quality.py --contexts 2 --context-len 2048 \
        --out benchmarks/results/score_sampling_recall.json

SmolLM2-135M-Instruct (float32, CPU) runs each evaluation context once in full precision; every layer's
post-RoPE q, k, v and exact causal attention (out, lse) are captured. Keys and values are quantized with
the layer's 1-bit codebooks (``artifacts/smollm2-demo/antkv-1``) and every token is scored with
``anchor_scores``: the exact Anchor Score (``kind="ans"``, ``row_stride=1``) is the reference, and each
variant -- row-sampled "ans" for row_stride R in {2, 3, 6, 12} and band in {64, 256}, the cheaper
"attention" and "sensitivity" scores, and random scores -- is compared with it per (context, layer, KV head):

    recall    |top-k(variant) ∩ top-k(exact)| / k, k = ceil(anchor_ratio * T)  (the store's anchor count)
    mass      sum of exact scores over top-k(variant) / the same over top-k(exact)
    spearman  rank correlation of variant and exact scores over all T tokens

The table and the JSON report the mean over contexts, layers and KV heads; the JSON also keeps per-layer
means and the raw values [context][layer][head].
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm.auto import tqdm

from antkv_compile.artifact import load_artifact
from antkv_compile.hf_routing import chunk_logits, routed
from antkv_compile.models import load_model
from antkv_compile.numerics.anchor_score import anchor_scores
from antkv_compile.numerics.attention import causal_mask, exact_attention
from antkv_compile.reporting import environment, write_json
from antkv_compile.texts import evaluation_text, token_contexts

METRICS = ("recall", "mass", "spearman")


def variants(strides: list[int], bands: list[int]) -> list[dict]:
    """Score variants compared with the exact Anchor Score: name, kind, row_stride, band."""
    out = [dict(name=f"ans-R{r}-band{b}", kind="ans", row_stride=r, band=b) for b in bands for r in strides]
    out += [dict(name=k, kind=k, row_stride=1, band=0) for k in ("attention", "sensitivity", "random")]
    return out


@torch.no_grad()
def capture_layers(model, ids: torch.Tensor) -> dict[int, dict]:
    """Run one context [1, T] in full precision; per layer: q, k, v, out, lse, scale."""
    captured: dict[int, dict] = {}

    def handler(layer, q, k, v, scale):
        pos = torch.arange(q.shape[2])
        out, lse = exact_attention(q, k, v, scale, causal_mask(pos, pos))
        captured[layer] = dict(q=q.float(), k=k.float(), v=v.float(), out=out, lse=lse, scale=scale)
        return out.to(q.dtype)

    with routed(model, handler):
        chunk_logits(model, ids, 0)
    return captured


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dim (ties broken by position)."""
    return x.argsort(-1).argsort(-1).double()


def compare(score: torch.Tensor, exact: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Recall, captured mass and Spearman of ``score`` vs ``exact``, both [Hkv, T] -> each [Hkv]."""
    top_v = score.topk(k, -1).indices
    top_e = exact.topk(k, -1).indices
    hit = torch.zeros_like(exact, dtype=torch.bool).scatter_(-1, top_e, True)
    recall = hit.gather(-1, top_v).float().mean(-1)
    mass = exact.gather(-1, top_v).sum(-1) / exact.gather(-1, top_e).sum(-1)
    rv, re = rank(score), rank(exact)
    rv, re = rv - rv.mean(-1, keepdim=True), re - re.mean(-1, keepdim=True)
    spearman = (rv * re).sum(-1) / (rv.norm(dim=-1) * re.norm(dim=-1))
    return dict(recall=recall, mass=mass, spearman=spearman.float())


def score_layer(cap: dict, cb_k, cb_v, specs: list[dict], k: int, generator: torch.Generator) -> dict:
    """Per variant, the metrics [Hkv] of one layer against its exact Anchor Score."""
    q, kk, v = cap["q"], cap["k"], cap["v"]
    _, k_hat = cb_k.quantize(kk)
    _, v_hat = cb_v.quantize(v)
    pos = torch.arange(q.shape[2])
    common = dict(k_hat=k_hat, v_hat=v_hat, mask=causal_mask(pos, pos), generator=generator)

    def score(kind, row_stride=1, band=256):
        return anchor_scores(q, kk, v, cap["out"], cap["lse"], cap["scale"], kind=kind,
                             row_stride=row_stride, band=band, **common)[0]

    exact = score("ans")
    return {s["name"]: compare(score(s["kind"], s["row_stride"], max(s["band"], 1)), exact, k) for s in specs}


def summarize(raw: dict, specs: list[dict]) -> list[dict]:
    """raw[name][metric] = [context][layer][head] lists -> one row per variant (means, per-layer means)."""
    rows = []
    for s in specs:
        row = dict(s)
        for m in METRICS:
            t = torch.tensor(raw[s["name"]][m])  # [C, L, H]
            row[m] = t.mean().item()
            row[f"{m}_min"] = t.min().item()
            row[f"{m}_per_layer"] = [round(x, 4) for x in t.mean((0, 2)).tolist()]
        rows.append(row)
    return rows


def print_table(rows: list[dict], k: int, t: int) -> None:
    print(f"\nTop-{k} of {t} tokens per (layer, KV head) vs the exact Anchor Score "
          "(mean over contexts, layers, KV heads; min in brackets)")
    print(f"{'variant':<18} {'recall':>16} {'captured mass':>16} {'spearman':>16}")
    for r in rows:
        cells = [f"{r[m]:.3f} [{r[m + '_min']:.3f}]" for m in METRICS]
        print(f"{r['name']:<18} " + " ".join(f"{c:>16}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--artifact", default="artifacts/smollm2-demo/antkv-1")
    p.add_argument("--contexts", type=int, default=2)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (timing runs)")
    p.add_argument("--strides", type=int, nargs="+", default=[2, 3, 6, 12])
    p.add_argument("--bands", type=int, nargs="+", default=[64, 256])
    p.add_argument("--anchor-ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/score_sampling_recall.json")
    args = p.parse_args()

    t0 = time.time()
    model, tokenizer = load_model(args.model, torch.float32, "cpu")
    art = load_artifact(args.artifact)
    contexts = token_contexts(tokenizer, evaluation_text(), args.context_len, args.contexts)
    num_layers = min(art.num_layers, args.layers or art.num_layers)
    specs = variants(args.strides, args.bands)
    k = math.ceil(args.anchor_ratio * args.context_len)
    gen = torch.Generator().manual_seed(args.seed)
    raw = {s["name"]: {m: [] for m in METRICS} for s in specs}

    bar = tqdm(total=len(contexts) * num_layers, desc="layers", unit="layer")
    for ids in contexts:
        captured = capture_layers(model, ids[None])
        per_layer = []
        for layer in range(num_layers):
            per_layer.append(score_layer(captured[layer], art.keys[layer], art.values[layer], specs, k, gen))
            bar.update(1)
        for s in specs:
            for m in METRICS:
                raw[s["name"]][m].append([r[s["name"]][m].tolist() for r in per_layer])
        del captured
    bar.close()

    rows = summarize(raw, specs)
    print_table(rows, k, args.context_len)
    seconds = time.time() - t0
    print(f"\n{len(contexts)} contexts x {num_layers} layers in {seconds:.0f} s")
    write_json(args.out, dict(
        environment=environment(),
        setup=dict(model=args.model, artifact=args.artifact, contexts=len(contexts), context_len=args.context_len,
                   layers=num_layers, anchor_ratio=args.anchor_ratio, top_k=k, seed=args.seed,
                   reference="anchor_scores(kind='ans', row_stride=1)"),
        seconds=seconds,
        results=rows,
        raw=raw,
    ))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
