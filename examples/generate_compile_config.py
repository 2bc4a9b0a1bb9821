"""``generate(..., compile_config=CompileConfig(backend="antkv"))``: transformers runs the prompt uncompiled and
only the decode steps compiled; the first compiled step moves the prompt's keys and values from the dense
static cache into the compressed store.

    python examples/generate_compile_config.py          # SmolLM2-135M-Instruct
    python examples/generate_compile_config.py --tiny   # a tiny random-weight Llama, seconds on a CPU

``ANTKV_EXAMPLE_TINY=1`` works like ``--tiny``.
"""
import argparse
import os

import torch
from transformers import CompileConfig

from antkv_compile.backend import last_compiles
from antkv_compile.calibration import load_or_calibrate
from antkv_compile.models import load_model, tiny_model, tiny_tokenizer

PROMPT = "The capital of France is"


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

    # mode=None: torch.compile takes either a mode or options (CompileConfig's default mode is "reduce-overhead")
    config = CompileConfig(backend="antkv", mode=None, options={"artifact": artifact, **extra})
    if not torch.cuda.is_available():
        config._compile_all_devices = True  # transformers compiles inside generate on a CPU only with this flag
    out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                         compile_config=config)
    print("prompt:   ", PROMPT)
    print("generated:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    rewritten = sum(r["after"] is not None for r in last_compiles)
    print(f"compressed graphs: {rewritten} of {len(last_compiles)} compiled")


if __name__ == "__main__":
    main()
