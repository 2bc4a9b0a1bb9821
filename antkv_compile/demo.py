"""The main job: compile SmolLM2 with ``backend="antkv"``, generate text, report KV memory and perplexity.

    antkv-compile demo [--bits 1] [--new-tokens 32] [--ppl-tokens 1024]

1. Codebooks: a calibrated artifact (``artifacts/smollm2-demo/antkv-<bits>-pre-rope``, made on first run from
   2048 tokens of Python's pydoc topics; any ``--artifact DIR`` works too).
2. ``torch.compile(model, backend="antkv", options={"artifact": ..., "bits": ...})``: prefill and decode
   both run compiled through the rewritten graphs; the dense StaticCache buffers are released.
3. Greedy generation from a chat prompt, then the KV memory held by the compressed store against the
   full-precision cache of the same length.
4. Perplexity of a sample of the evaluation text through the compiled model (chunks of 32 tokens:
   exactly the decode path) against the uncompiled full-precision model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPT = "Explain in two sentences what a key-value cache is in a transformer language model."


# First run: codebooks from 2048 tokens of pydoc topics, 10 k-means iterations (about a minute of calibration on
# 2 CPU cores; 4096 tokens x 20 iterations took several, for the same demo perplexity: see the README).
DEMO_CALIB_TOKENS = 2048
DEMO_CALIB_ITERS = 10


def demo_artifact_dir(bits: str, key_space: str = "pre_rope") -> Path:
    """Where the demo keeps its codebooks (``eval --quick`` reuses them)."""
    return Path(f"artifacts/smollm2-demo/antkv-{bits}-{key_space.replace('_', '-')}")


def _artifact(model, tok, bits: str, directory: str | None, calib_tokens: int, key_space: str = "pre_rope",
              iters: int = DEMO_CALIB_ITERS, progress: bool = True):
    from .artifact import ArtifactError, load_artifact
    from .calibration import load_or_calibrate

    path = Path(directory) if directory else demo_artifact_dir(bits, key_space)
    try:
        return load_artifact(path), path
    except ArtifactError as e:
        if path.exists():
            print(f"not using {path}: {e}", flush=True)
    print(f"calibrating {bits}-bit codebooks on {calib_tokens} tokens of pydoc topics -> {path}", flush=True)
    t0 = time.time()
    art = load_or_calibrate(model, tok, path, bits=bits, key_space=key_space, tokens=calib_tokens, iters=iters,
                            model_id="SmolLM2-135M-Instruct", progress=progress)
    print(f"calibrated in {time.time() - t0:.0f}s", flush=True)
    return art, path


def _dense_bytes(model, length: int, batch: int = 1, element_bytes: int = 2) -> int:
    from .models import kv_geometry

    g = kv_geometry(model.config)
    return batch * length * g.kv_elements_per_token() * element_bytes


def _kv_bytes(mem: dict) -> int:
    return mem["codes"] + mem["anchors"] + mem["window_kv"]


@torch.no_grad()
def run(bits: str = "1", new_tokens: int = 32, ppl_tokens: int = 1024, artifact: str | None = None,
        calib_tokens: int = DEMO_CALIB_TOKENS, key_space: str = "pre_rope", calib_iters: int = DEMO_CALIB_ITERS,
        progress: bool = True) -> dict:
    from transformers import StaticCache

    from .backend import last_compiles, parse_options
    from .hf_compat import with_cache
    from .models import load_model
    from .runtime.state import session_for
    from .texts import evaluation_text, token_contexts

    t0 = time.time()
    model, tok = load_model()
    art, art_path = _artifact(model, tok, bits, artifact, calib_tokens, key_space, calib_iters, progress)
    options = {"artifact": art, "bits": bits}
    # dynamic=False: every cache shares one static length, so each step shape compiles once, statically
    compiled = torch.compile(model, backend="antkv", options=options, dynamic=False)
    config, artifact_obj, _, _ = parse_options(options)
    session = session_for(config, artifact_obj)
    cap = ppl_tokens + new_tokens

    def kw(cache):  # the cache under the keyword this transformers takes (no deprecation notice)
        return with_cache(model, cache)

    # 1. perplexity of a long sample through the compiled decode path (chunks of 32 = the store's flush)
    sample = token_contexts(tok, evaluation_text(), ppl_tokens, num_contexts=1)
    full_logits = model(input_ids=sample).logits.float()
    nll_full = F.cross_entropy(full_logits[0, :-1], sample[0, 1:]).item()
    cache = StaticCache(config=model.config, max_cache_len=cap)
    nll, count = 0.0, 0
    for s in range(0, ppl_tokens, 32):
        logits = compiled(input_ids=sample[:, s:s + 32], **kw(cache), use_cache=True).logits.float()
        targets = sample[0, s + 1:s + 33]
        nll += F.cross_entropy(logits[0, : targets.numel()], targets, reduction="sum").item()
        count += targets.numel()
    mem = session.memory_bytes()
    del cache

    # 2. greedy generation from a chat prompt (prefill + decode, both compiled)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    cache = StaticCache(config=model.config, max_cache_len=cap)
    t1 = time.time()
    out = compiled(input_ids=ids, **kw(cache), use_cache=True)
    generated: list[int] = []
    for _ in range(new_tokens):
        generated.append(int(out.logits[0, -1].argmax()))
        if generated[-1] == tok.eos_token_id:
            break
        out = compiled(input_ids=torch.tensor([[generated[-1]]]), **kw(cache), use_cache=True)
    element = next(model.parameters()).element_size()
    return {
        "prompt": PROMPT, "generated": tok.decode(generated, skip_special_tokens=True),
        "generated_tokens": len(generated), "generate_seconds_incl_compile": round(time.time() - t1, 1),
        "ppl_tokens": ppl_tokens, "perplexity_full_precision": math.exp(nll_full),
        "perplexity_antkv_compiled": math.exp(nll / count),
        "kv_bytes_after_ppl": mem, "kv_bytes_full_precision": _dense_bytes(model, ppl_tokens, element_bytes=element),
        "dtype": str(next(model.parameters()).dtype), "graphs_compiled": len(last_compiles),
        "graphs_rewritten": sum(1 for c in last_compiles if c.get("after") is not None),
        "artifact": str(art_path), "key_space": art.key_space, "seconds": round(time.time() - t0, 1),
    }


def main(args) -> int:
    r = run(args.bits, args.new_tokens, args.ppl_tokens, args.artifact, args.calib_tokens,
            "post_rope" if args.post_rope else "pre_rope", args.calib_iters, not args.quiet)
    m = r["kv_bytes_after_ppl"]
    print(f"\nprompt:    {r['prompt']}\nantkv-{args.bits} ({r['key_space']} keys): {r['generated']!r}")
    print(f"perplexity on {r['ppl_tokens']} tokens of the evaluation text: full precision "
          f"{r['perplexity_full_precision']:.3f}, compiled antkv-{args.bits} {r['perplexity_antkv_compiled']:.3f} "
          f"(x{r['perplexity_antkv_compiled'] / r['perplexity_full_precision']:.3f})")
    print(f"KV memory holding those {r['ppl_tokens']} tokens: {_kv_bytes(m):,} bytes (codes {m['codes']:,}, anchors "
          f"{m['anchors']:,}, window K/V {m['window_kv']:,}) vs {r['kv_bytes_full_precision']:,} bytes for the "
          f"{r['dtype']} cache ({r['kv_bytes_full_precision'] / max(1, _kv_bytes(m)):.1f}x smaller); codebooks "
          f"{m['codebooks']:,} bytes per model, window queries kept for scoring {m['window_queries']:,} bytes")
    print(f"{r['graphs_compiled']} graphs compiled, {r['graphs_rewritten']} rewritten; {r['seconds']:.0f}s in all")
    if args.out:
        from .reporting import environment, write_json

        write_json(args.out, {"environment": environment(), **r})
    return 0
