"""Worker of ``tests/test_tensor_parallel.py``: one process of a tensor-parallel run (under ``torchrun``, gloo)
or the whole world-size-1 run (a plain process).

``python tests/tp_worker.py MODEL_DIR ARTIFACT_DIR OUT_DIR``: loads the saved tiny Llama (world size > 1:
``distributed_config=DistributedConfig(tp_plan="auto")``, transformers' own plan: q/k/v/gate/up colwise, o/down
rowwise), runs greedy decoding with a StaticCache through ``torch.compile(model, backend="antkv")`` for each case
of :data:`CASES`, and writes ``OUT_DIR/rank{r}.pt`` per rank: tokens, per-step logits, the KV heads each layer's
store holds, the slice of the codebooks and the warnings of each case. With ``world size > 1`` it also runs the
``fallback`` case: only k_proj / v_proj sharded (torch's ColwiseParallel), a layout whose query heads are not
the groups of the rank's KV heads, which the backend must compile unchanged with one warning.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

PROMPT, STEPS, CAP = 20, 6, 32
CASES = {
    # every flushed token becomes an anchor: exact up to float reassociation
    "exact": dict(anchor_ratio=1.0, window=8, flush=4, inner="eager"),
    "exact_inductor": dict(anchor_ratio=1.0, window=8, flush=4),
    # 1-bit codes for most tokens: quantization visible in the logits
    "quantized": dict(anchor_ratio=0.01, window=8, flush=4, inner="eager"),
}


def greedy(fn, model, ids):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=CAP)
    toks, logits = [], []
    with torch.no_grad():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(STEPS):
            logits.append(out.logits[:, -1].float())
            nxt = out.logits[:, -1:].argmax(-1)
            toks.append(int(nxt))
            out = fn(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return toks, torch.cat(logits)


def run_case(model, ids, options):
    from antkv_compile.backend import AntKVFallbackWarning, last_compiles

    torch._dynamo.reset()
    del last_compiles[:]
    compiled = torch.compile(model, backend="antkv", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toks, logits = greedy(compiled, model, ids)
    rec = next((r for r in reversed(last_compiles) if r.get("session") is not None), None)
    session = rec["session"] if rec else None
    heads = {}
    if session is not None:
        for (layer, _), store in session.stores.items():
            heads[layer] = int(store.geom.num_kv_heads)
    art = session.artifact if session is not None else None
    return {
        "tokens": toks, "logits": logits, "store_heads": heads,
        "kv_slice": art.kv_heads if art is not None else None,
        "codebook_means": [cb.mean.clone() for cb in art.keys] if art is not None else None,
        "fallback_warnings": [str(w.message) for w in caught if issubclass(w.category, AntKVFallbackWarning)],
        "rewrites": [bool(r["plan"].rewrites) for r in last_compiles],
        "shard": repr(rec.get("shard")) if rec else None,
    }


def main(model_dir, artifact_dir, out_dir):
    from transformers import AutoModelForCausalLM

    from antkv_compile.artifact import load_artifact

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    kw = dict(attn_implementation="sdpa", dtype=torch.float32)
    if world > 1:
        from transformers import DistributedConfig

        kw["distributed_config"] = DistributedConfig(tp_plan="auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    artifact = load_artifact(artifact_dir)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    result = {"world": world, "rank": rank, "dense": greedy(model, model, ids)}
    for name, opts in CASES.items():
        result[name] = run_case(model, ids, dict(opts, artifact=artifact))
    if world > 1:
        result["fallback"] = fallback_case(model_dir, artifact, ids)
        import torch.distributed as dist

        dist.barrier()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def fallback_case(model_dir, artifact, ids):
    """k_proj / v_proj sharded by hand, q_proj whole: every rank attends with all query heads over its one KV
    head (a model of its own, deterministic); the backend cannot match the artifact to such a rank and must
    compile it unchanged (one warning), i.e. give exactly what the uncompiled model gives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    plan = {f"model.layers.{i}.self_attn.{p}": ColwiseParallel()
            for i in range(model.config.num_hidden_layers) for p in ("k_proj", "v_proj")}
    parallelize_module(model, mesh, plan)
    for layer in model.model.layers:  # all query heads read the rank's KV heads
        attn = layer.self_attn
        attn.num_key_value_groups = model.config.num_attention_heads * attn.head_dim // attn.k_proj.weight.to_local().shape[0]
    dense = greedy(model, model, ids)
    out = run_case(model, ids, dict(CASES["quantized"], artifact=artifact))
    out["dense"] = dense
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
