"""Command line of the end-to-end benchmark: arguments, --plan-only, --merge, the run, main."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from .common import _config_has, _round_up, _split, batch_list, CONFIGS, DEFAULT_RUNS, parse_size, RUNS
from .model import model_config

from .runner import Bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "tiny"],
                   help="model shape with random weights: Llama-3-8B (default) or the tiny test Llama")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {','.join(RUNS)} (default {DEFAULT_RUNS})")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"throughput/memory configurations: {','.join(CONFIGS)}")
    p.add_argument("--contexts", default="32768", help="throughput contexts (comma list; default 32768)")
    p.add_argument("--batches", default="auto",
                   help="comma list ('max' = the planner's largest batch, at most --max-batch), or 'auto': 1, 2, "
                        "4, ... up to that, and that one")
    p.add_argument("--max-batch", type=int, default=1024, help="cap of the automatic batch sweep")
    p.add_argument("--no-planner-skip", action="store_true", help="also run batch sizes the planner says do not fit")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before timing (the first compiles)")
    p.add_argument("--profile", action="store_true",
                   help="GPU time per kernel of the warm-up steps after the first (torch.profiler; use --warmup >= 3)")
    p.add_argument("--prompt-len", type=int, default=16,
                   help="real compiled prefill that starts the antkv stores (and learns their codebooks); short, "
                        "because its dense StaticCache (B x prompt-len tokens) is allocated until it is released")
    p.add_argument("--fill", default="store", choices=["store", "prefill"],
                   help="bring antkv stores to the context by store.fill (default) or a real chunked prefill")
    p.add_argument("--fill-rows", type=int, default=16384, help="store.fill tokens per call summed over the batch")
    p.add_argument("--fill-chunk", type=int, default=0, help="store.fill tokens per sequence per call (0: from --fill-rows)")
    p.add_argument("--capacity-configs", default="antkv-1", help="configurations of the capacity run")
    p.add_argument("--capacity-context", type=int, default=0, help="context of the capacity run (0: the planner's longest)")
    p.add_argument("--capacity-margin", default="2GiB", help="memory left free when the planner picks the capacity")
    p.add_argument("--capacity-retries", type=int, default=1, help="retries at 90%% of the context after an OOM")
    p.add_argument("--max-prefill-fill", type=int, default=1 << 16,
                   help="longest context filled by a real prefill when the store has no fill()")
    p.add_argument("--prefill-configs", default="antkv-1", help="configurations of the prefill128k run")
    p.add_argument("--prefill-context", type=int, default=131072)
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--memory-batch", type=int, default=1, help="batch of the memory run's points")
    p.add_argument("--check-layers", default="0,-1", help="layers whose decode output is checked (capacity, prefill)")
    p.add_argument("--check-tol", type=float, default=3e-2, help="bound on the check's relative error (bf16 kernels)")
    p.add_argument("--budget", default="auto", help="memory budget of the planner: 'auto' (free device memory - "
                   "--reserve) or e.g. 79GiB")
    # non-PyTorch memory grows after the start (CUDA context 0.55 -> 1.26 GiB once cuBLAS, Triton and NVRTC modules
    # are loaded) and the allocator fragments (~0.8 GiB): with 1 GiB the planner's largest 1-bit batch ran out of
    # memory once the window buffers were preallocated at full size (NOTES.md "Exact programs, merge and launches (decode)")
    p.add_argument("--reserve", default="2.5GiB", help="kept out of the automatic budget")
    p.add_argument("--baseline-backend", default="inductor", help="torch.compile backend of the baselines (tests: eager)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="antkv's inner compiler (decode)")
    p.add_argument("--prompt-inner", default="eager", choices=["inductor", "eager"],
                   help="antkv's inner compiler for the short prompt that starts the stores (not timed)")
    p.add_argument("--antkv-options", default="", help='extra antkv options as JSON, e.g. \'{"store": "kernels"}\'')
    p.add_argument("--dynamic", default="auto", choices=["auto", "static"],
                   help="auto: Dynamo's automatic dynamic batch (2 compiles per configuration); static: one compile per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for JSON + plots")
    p.add_argument("--name", default=None, help="file name stem (default e2e_bench_<shape>_<date>)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the points the planner schedules (needs --budget; builds no model)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the result files of several calls into one report (runs nothing)")
    p.add_argument("--world-size", type=int, default=1,
                   help="tensor-parallel GPUs: the planner's points per rank (--budget is each GPU's); --plan-only only")
    p.add_argument("--quiet", action="store_true")


def plan_only(args) -> int:
    """What a run would do, from the planner alone (no device, no model)."""
    from ..planner import MemoryModel, ModelShape
    from ..config import get_preset

    if args.budget == "auto":
        raise SystemExit("--plan-only needs --budget (e.g. 79GiB)")
    budget = parse_size(args.budget)
    shape = ModelShape.from_config(model_config(args.shape), args.shape)
    tp = args.world_size
    try:
        MemoryModel(shape, None, world_size=tp)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = {"budget": budget, "world_size": tp, "budget_is": "per rank (one GPU)", "throughput": {}, "capacity": {}}
    runs = _split(args.runs)
    for name in _split(args.configs):
        spec = CONFIGS[name]
        mm = MemoryModel(shape, get_preset(spec.bits) if spec.bits else None, world_size=tp)
        for ctx in [int(x) for x in _split(args.contexts)]:
            cap = _round_up(ctx + args.warmup + args.steps + 2, 64)
            pmax = mm.largest_batch(cap, budget)
            batches = [b for b in batch_list(args.batches, pmax, args.max_batch) if b <= pmax or args.no_planner_skip]
            out["throughput"][f"{name}@{ctx}"] = {"planner_largest_batch": pmax, "batches": batches,
                                                  "sequence_tokens_to_fill": sum(batches) * ctx if spec.kind == "antkv" else 0}
            if "throughput" in runs:
                print(f"throughput {name:12s} context {ctx:,}: planner's largest batch {pmax}; batches {batches}")
    for name in _split(args.capacity_configs):
        spec = CONFIGS[name]
        if spec.kind != "antkv":
            continue
        mm = MemoryModel(shape, get_preset(spec.bits), world_size=tp)
        cap = args.capacity_context or mm.longest_context(1, budget - parse_size(args.capacity_margin)) // 1024 * 1024
        out["capacity"][name] = {"context": cap, "planner_longest": mm.longest_context(1, budget)}
        if "capacity" in runs:
            print(f"capacity   {name:12s} context {cap:,} (planner's longest {mm.longest_context(1, budget):,})")
    print(json.dumps(out, indent=1))
    return 0


def merge(args) -> int:
    """Combine the JSON files of several calls (the GPU work split into calls of <= 10 minutes) into one
    report: tables, plots and a merged JSON (``--name``, default e2e_bench_merged_<date>)."""
    from ..planner import ModelShape

    data = [json.loads(Path(f).read_text()) for f in args.merge]
    base = data[0]
    shape = (base.get("model") or {}).get("shape", args.shape)
    args.shape = shape
    if not args.name:
        args.name = f"e2e_bench_{shape}_merged_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    bench = Bench(args)
    for key in ("environment", "device", "model"):
        bench.results[key] = base.get(key)
    for key in ("throughput", "capacity", "prefill", "memory_points"):
        bench.results[key] = [x for d in data for x in d.get(key, [])]
    for f, d in zip(args.merge, data):
        for k, v in (d.get("sections") or {}).items():
            bench.results["sections"][f"{Path(f).stem}:{k}"] = v
        for k, v in (d.get("errors") or {}).items():
            bench.results["errors"][f"{Path(f).stem}:{k}"] = v
    bench.results["merged_from"] = [{"file": str(f), "command": (d.get("environment") or {}).get("command"),
                                     "date": (d.get("environment") or {}).get("date"),
                                     "device": (d.get("environment") or {}).get("device")} for f, d in zip(args.merge, data)]
    bench.results["settings"]["merge"] = [str(f) for f in args.merge]
    bench.shape = ModelShape.from_config(model_config(shape), shape)
    bench.budget = int((base.get("device") or {}).get("budget_bytes") or parse_size("80GB"))
    bench.supports_capacity = _config_has("capacity")
    try:
        bench.results["plots"] = bench.plots()
    except Exception as exc:  # noqa: BLE001
        bench.log(f"plots failed: {exc!r}")
    bench.results["complete"] = all(d.get("complete") for d in data)
    bench.report()
    bench.save()
    return 0


def run(args) -> int:
    if args.plan_only:
        return plan_only(args)
    if getattr(args, "world_size", 1) != 1:
        raise SystemExit("--world-size applies to --plan-only (the planner's points per rank): the measured runs "
                         "build one unsharded model per process and do not run under tensor parallelism yet")
    if args.merge:
        return merge(args)
    for r in _split(args.runs):
        if r not in RUNS:
            raise SystemExit(f"unknown run {r!r}; choose from {RUNS}")
    for c in _split(args.configs) + _split(args.capacity_configs) + _split(args.prefill_configs):
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; choose from {list(CONFIGS)}")
    bench = Bench(args)
    bench.section("setup", bench.setup)
    if bench.model is None:
        bench.report()
        return 1
    runs = _split(args.runs)
    table = {"throughput": bench.run_throughput, "capacity": bench.run_capacity, "prefill128k": bench.run_prefill,
             "memory": bench.run_memory}
    for name in RUNS:
        if name in runs:
            bench.section(name, table[name])
    try:
        bench.results["plots"] = bench.plots()
    except Exception as exc:  # noqa: BLE001
        bench.log(f"plots failed: {exc!r}")
    bench.results["complete"] = True
    bench.report()
    bench.save()
    (bench.out_dir / f"{bench.name}.log").write_text("\n".join(bench.lines) + "\n")
    return 0 if not bench.results["errors"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e2e_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    import logging
    import warnings

    # the stores reallocate their window buffers around every long chunk (fill, prefill): without expandable
    # segments that fragments the caching allocator by ~1.3 GiB at the planner's largest batch (measured OOM,
    # NOTES.md "Exact programs, merge and launches (decode)"); read at the first CUDA allocation, so set before any
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*no codebook artifact.*")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
