"""A codebook artifact for the speed benchmarks' random-weight model (Llama-3-8B shape by default).

The e2e benchmark measures speed and memory, which do not depend on the codebooks' values, but the default recipe
(keys coded before RoPE in RoPE-pair sub-spaces) needs an artifact that carries the model's RoPE. This calibrates
one the usual way (statistics from the model's own forward, sensitivity-weighted k-means, pair layout) on random
token ids through the same random-weight model the benchmark builds (same shape, seed and dtype), so that the
compiled benchmark model accepts it:

    python benchmarks/bench_artifact.py --bits 1 --out /tmp/bench_artifacts/antkv-1
    python benchmarks/e2e_bench.py ... --antkv-options '{"artifact": "/tmp/bench_artifacts/antkv-1"}'
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "tiny"])
    p.add_argument("--bits", default="1")
    p.add_argument("--tokens", type=int, default=4096, help="random calibration tokens")
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0, help="the benchmark's model seed")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import dataclasses

    from antkv_compile.bench import build_model
    from antkv_compile.calibration import collect_statistics, learn_artifact, model_identity
    from antkv_compile.config import get_preset
    from antkv_compile.eval_suite import Recipe
    from antkv_compile.numerics.rope import model_rope_parameters

    device = torch.device(args.device)
    model = build_model(args.shape, device, getattr(torch, args.dtype), seed=args.seed)
    gen = torch.Generator(device=device).manual_seed(1234)
    ctx = torch.randint(3, model.config.vocab_size, (max(1, args.tokens // args.context_len), args.context_len),
                        device=device, generator=gen)
    stats = collect_statistics(model, ctx, progress=False, key_space="pre_rope")
    recipe = Recipe(args.bits, key_space="pre_rope")
    key_opts, value_opts = (dataclasses.replace(o, iters=args.iters) for o in (recipe.key_options, recipe.value_options))
    art = learn_artifact(stats, get_preset(args.bits), options=key_opts, value_options=value_opts,
                         model_info=model_identity(model, f"random-{args.shape}-seed{args.seed}"), key_space="pre_rope",
                         rope=model_rope_parameters(model), progress=False,
                         text_info={"text": "random token ids", "tokens": int(ctx.numel())})
    art.save(args.out)
    print(f"wrote {args.out} ({args.bits}-bit, pre-RoPE pair layout, {len(art.keys)} layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
