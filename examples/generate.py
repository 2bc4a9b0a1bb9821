"""Generate text with a model compiled by ``backend="antkv"`` through Hugging Face ``generate``.

    python examples/generate.py          # SmolLM2-135M-Instruct; codebooks calibrated on the first run
    python examples/generate.py --tiny   # a tiny random-weight Llama, seconds on a CPU (what the tests run)

``ANTKV_EXAMPLE_TINY=1`` works like ``--tiny``. The prompt and the decode steps both run compiled: the KV cache
is held as ~1-bit codes plus full-precision anchors and a recent window.
"""
import argparse
import os

import torch

from antkv_compile.backend import last_compiles
from antkv_compile.calibration import load_or_calibrate
from antkv_compile.models import load_model, tiny_model, tiny_tokenizer

PROMPT = "Explain in two sentences what a key-value cache is in a transformer language model."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=os.environ.get("ANTKV_EXAMPLE_TINY") == "1")
    p.add_argument("--artifact", default=None, help="codebook artifact directory (made on first use)")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()

    if args.tiny:
        model, tok = tiny_model("llama"), tiny_tokenizer()
        ids = tok(PROMPT, return_tensors="pt").input_ids
        artifact_dir = args.artifact or "artifacts/tiny-llama/antkv-1-pre-rope"
        extra = {"inner": "eager"}  # tiny mode only: skip Inductor for the non-attention ops (fast tests)
    else:
        model, tok = load_model("smollm2")  # SmolLM2-135M-Instruct, float32, CPU
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True).input_ids
        artifact_dir = args.artifact or "artifacts/smollm2-demo/antkv-1-pre-rope"  # what `bash scripts/main.sh` writes
        extra = {}

    # 1-bit codebooks, keys coded before RoPE: loaded, or calibrated once on Python's pydoc topics and saved
    artifact = load_or_calibrate(model, tok, artifact_dir, bits="1", key_space="pre_rope")

    model.compile(backend="antkv", options={"artifact": artifact, "bits": "1", **extra})
    # generate runs under torch.no_grad() itself; the static cache is what the backend compresses
    out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")

    print("prompt:   ", PROMPT)
    print("generated:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    rewritten = sum(r["after"] is not None for r in last_compiles)
    print(f"compressed graphs: {rewritten} of {len(last_compiles)} compiled")


if __name__ == "__main__":
    main()
