"""Perplexity after a long prompt whose anchors were chosen by exact or row-sampled Anchor Scores.

    python benchmarks/prefill_score_ppl.py --out benchmarks/results/prefill_score_ppl.json

SmolLM2-135M-Instruct (float32, CPU, 1-bit codebooks ``artifacts/smollm2-demo/antkv-1``, keys after RoPE as
the kernels code them). Each evaluation context (license texts) is a ``--prefill``-token prompt in one chunk
-- its flush scores it over its own queries, which is where row sampling (``AnTKVConfig.score_row_stride``)
acts -- followed by the rest of the context in chunks of 32 (the decode protocol of
:mod:`antkv_compile.evaluation`). Perplexity counts only the predictions after the prompt, i.e. those that
read the prompt's codes and anchors. Rows: full precision; anchors by the exact score (R = 1); by the
sampled score at the default R = G (3 here), at R = 2G (half the rows beyond the band read by no head) and at a
stress setting; by accumulated attention; random
anchors; no anchors -- the last three show how much the choice of anchors moves this perplexity at all.
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from antkv_compile.artifact import load_artifact
from antkv_compile.config import AnTKVConfig
from antkv_compile.evaluation import MethodSpec, evaluate_method
from antkv_compile.models import load_model
from antkv_compile.reporting import environment, write_json
from antkv_compile.texts import evaluation_text, token_contexts


def methods() -> list[MethodSpec]:
    def antkv(name: str, **cfg) -> MethodSpec:
        return MethodSpec(name, "antkv", AnTKVConfig(bits="1", coded_path="dequantized", **cfg), "antkv-1")

    return [
        MethodSpec("full precision", "full"),
        antkv("anchors: exact AnS (R=1)", score_row_stride=1),
        antkv("anchors: sampled AnS (R=G=3, band 256, default)"),
        antkv("anchors: sampled AnS (R=2G=6, band 256)", score_row_stride=6),
        antkv("anchors: sampled AnS (R=12, band 64)", score_row_stride=12, score_band=64),
        antkv("anchors: accumulated attention", score="attention", score_row_stride=1),
        antkv("anchors: random", score="random"),
        antkv("anchors: none", score="none"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-demo/antkv-1")
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/prefill_score_ppl.json")
    args = p.parse_args()
    model, tokenizer = load_model("smollm2", torch.float32, "cpu")
    contexts = token_contexts(tokenizer, evaluation_text(), args.context_len, args.contexts)
    artifacts = {"antkv-1": load_artifact(args.artifact)}
    rows = []
    for spec in methods():
        r = evaluate_method(model, contexts, spec, artifacts, batch_size=args.batch_size, prefill=args.prefill)
        rows.append(r.row())
        print(f"{spec.name}: perplexity {r.perplexity:.4f} over {r.tokens} predictions ({r.seconds:.0f} s)", flush=True)
    base = rows[0]["perplexity"]
    table = Table(title=f"perplexity after a {args.prefill}-token prompt ({contexts.shape[0]} contexts of "
                        f"{contexts.shape[1]}, SmolLM2, 1 bit)")
    for col in ("anchors", "perplexity", "x full", "tokens"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], f"{r['perplexity']:.4f}", f"{r['perplexity'] / base:.4f}", str(r["tokens"]))
    Console().print(table)
    write_json(args.out, dict(environment=environment(), args=vars(args), results=rows))


if __name__ == "__main__":
    main()
