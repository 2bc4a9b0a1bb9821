"""Use the backend directly: ``torch.compile(model, backend="antkv")`` and a ``StaticCache``, one forward per
step (a prefill, then one token at a time), plus what the backend matched and rewrote (``explain``).

    python examples/forward_static_cache.py          # SmolLM2-135M-Instruct
    python examples/forward_static_cache.py --tiny   # a tiny random-weight Llama, seconds on a CPU

``ANTKV_EXAMPLE_TINY=1`` works like ``--tiny``.
"""
import argparse
import os

import torch
from transformers import StaticCache

import antkv_compile
from antkv_compile.calibration import load_or_calibrate
from antkv_compile.hf_compat import with_cache
from antkv_compile.models import load_model, tiny_model, tiny_tokenizer

PROMPT = "A key-value cache stores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=os.environ.get("ANTKV_EXAMPLE_TINY") == "1")
    p.add_argument("--artifact", default=None, help="codebook artifact directory (made on first use)")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()

    if args.tiny:
        model, tok = tiny_model("llama"), tiny_tokenizer()
        artifact_dir = args.artifact or "artifacts/tiny-llama/antkv-1-pre-rope"
        extra = {"inner": "eager"}  # tiny mode only: skip Inductor for the non-attention ops (fast tests)
    else:
        model, tok = load_model("smollm2")
        artifact_dir = args.artifact or "artifacts/smollm2-demo/antkv-1-pre-rope"  # what `bash scripts/main.sh` writes
        extra = {}
    ids = tok(PROMPT, return_tensors="pt").input_ids
    artifact = load_or_calibrate(model, tok, artifact_dir, bits="1", key_space="pre_rope")

    compiled = torch.compile(model, backend="antkv", options={"artifact": artifact, **extra})
    # the cache must hold the prompt and every new token (a longer input raises CacheCapacityError)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.new_tokens)
    tokens = []
    with torch.inference_mode():  # inference only: torch.no_grad() works too
        # with_cache passes the cache as cache= (transformers 5.2x) or past_key_values= (older 5.x)
        logits = compiled(**with_cache(model, cache, input_ids=ids)).logits  # the prefill
        for _ in range(args.new_tokens):  # decode steps, one token each, on the same cache
            tokens.append(int(logits[0, -1].argmax()))
            logits = compiled(**with_cache(model, cache, input_ids=torch.tensor([[tokens[-1]]]))).logits
    print("prompt:   ", PROMPT)
    print("generated:", repr(tok.decode(tokens, skip_special_tokens=True)))

    # what the backend found in each graph of a fresh prefill (matched attention / cache writes, the rewrite)
    fresh = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
    print(antkv_compile.explain(model, with_cache(model, fresh, input_ids=ids)).text(code=False))


if __name__ == "__main__":
    main()
