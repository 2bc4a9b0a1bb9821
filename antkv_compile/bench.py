"""End-to-end benchmark (``antkv-compile bench``, ``benchmarks/e2e_bench.py``): a whole compiled model decoding.

Model: Llama-3-8B's shape (transformers' ``LlamaConfig``: hidden 4096, 32 layers, 32 query / 8 KV heads,
head_dim 128, intermediate 14336, vocab 128256, rope_theta 500000) with **random bf16 weights**, built
directly on the device (``no_init_weights`` + one in-place ``normal_`` per matrix). Speed and memory do not
depend on the weight values; every table and the JSON say so. ``--shape tiny`` is the tiny random Llama of
:mod:`antkv_compile.models` (CPU tests run every part end to end with it).

Configurations (``--configs``):

* ``inductor`` -- baseline (a): ``torch.compile(model)`` (default Inductor backend), a static bf16 cache,
  transformers' SDPA attention (which expands the grouped KV heads);
* ``dense_decode`` -- baseline (b), a strong FP16/BF16 decode: the same, with the attention implementation
  ``antkv_dense_decode`` (:mod:`antkv_compile.baselines`: split-K flash-decoding that reads each valid byte
  of the static cache once per step, no GQA expansion); its floor is (weight bytes + KV bytes) / bandwidth
  and the benchmark reports the fraction of that bound it reaches;
* ``antkv-1`` / ``antkv-0.375`` -- ``torch.compile(model, backend="antkv", options={"bits": ...,
  "capacity": N})``: the StaticCache is allocated small (``max_cache_len`` = the longest single forward) and
  the compressed store holds N tokens per sequence. No codebook artifact: the backend learns codebooks from
  the first prefill's own keys and values (it warns; quality is not what is measured here, speed and
  memory are, and they do not depend on the codebook values).

Runs (``--runs``):

* ``throughput`` -- tokens/s of decode at each ``--contexts`` (32K) for batch sizes 1, 2, 4, ... up to the
  largest the capacity planner says fits (``--max-batch`` caps it; the planner's own largest batch is added
  as a point); a batch that runs out of device memory ends the sweep of its configuration. Baselines:
  the dense cache buffers are filled with random bf16 K/V and the cache position set (no 32K prefill).
  antkv: a real compiled prefill of ``--prompt-len`` tokens starts the stores (and learns the codebooks),
  then each layer's store is brought to the context by ``store.fill(q, k, v)`` (the real encode path:
  chunk-local exact causal attention, Anchor Scores over the chunk's queries, VQ encode, anchor
  selection; random bf16 q/k/v, chunks of ``--fill-rows`` / batch tokens per sequence, shared by the
  layers), and the cache's position bookkeeping (each layer's ``cumulative_length``) is advanced, so the
  next compiled decode step runs at position = context. Timing: ``--warmup`` steps (the first one
  compiles), then ``--steps`` steps between two CUDA events (the host may run ahead: what a decode loop
  gets); tokens/s = batch / step time.
* ``capacity`` -- batch 1, the longest context whose store fits beside the weights (the planner's answer
  for the measured free memory less ``--capacity-margin``, or ``--capacity-context``), filled as above,
  then real compiled decode steps at that length; one more step's attention output is checked against
  an fp32 reference on a slice (layers ``--check-layers``, sequence 0, KV head 0 and its query heads:
  decoded codes with anchors excluded, the anchors and the window exact; reference computed before the
  step mutates the store).
* ``prefill128k`` -- a real chunked prefill through the compiled model (``--prefill-chunk`` tokens per
  forward) to ``--prefill-context`` tokens, then timed decode steps and the same check.
* ``memory`` -- per configuration: weights, codes, anchors, window, codebooks, dense cache, workspace
  (peak - steady) and peak; the steady allocation after decoding must equal the accounted bytes (no hidden
  full-precision cache: the residual is reported and bounded), and each measured peak is compared with the
  capacity planner (:mod:`antkv_compile.planner`, ``antkv-compile plan``).
* ``quality`` -- a hook: ``ANTKV_BENCH_QUALITY_HOOK`` (default ``antkv_compile.gpu_quality:run``), called as
  ``run(device=..., progress=...)`` and returning a JSON-able dict (SmolLM2-135M perplexity, compiled CUDA
  path vs the CPU reference); recorded as not available when the module is missing.

Output: progress lines while running (flushed), JSON rewritten after every measured point and every
progress line of a long fill (``in_progress``: a time-out still leaves results and rates), tables printed
last, plots (tok/s vs batch, memory vs context). JSON, log and plots go to ``--out`` (default
``benchmarks/results``) with device, versions, date and command. The parts are selectable (``--runs``,
``--configs``, ``--batches``, ``--contexts``, ``--steps``), so the GPU work can be split into calls of a few
minutes; ``--merge A.json B.json ...`` combines their files into one report, and ``--plan-only --budget 79GiB``
prints what the planner schedules without a device.

Compilation: ``dynamic`` is left to Dynamo (``--dynamic auto``): batch 1 compiles once, the first batch > 1
recompiles with a symbolic batch that serves every larger batch (the sequence dimension of prompts is marked
static: the rewrite needs static token counts); ``--dynamic static`` compiles every point anew. Every
(configuration, context / capacity) group starts from ``torch._dynamo.reset()``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

WEIGHTS_NOTE = "random bf16 weights: speed and memory do not depend on the weight values"
CODEBOOK_NOTE = ("antkv: no codebook artifact, codebooks learned from the first prefill's own keys/values "
                 "(speed and memory do not depend on the codebook values)")
RUNS = ("throughput", "capacity", "prefill128k", "memory", "quality")
DEFAULT_RUNS = "throughput,capacity,prefill128k,memory"
TARGET_SPEEDUP = 5.0
TARGET_CAPACITY = 4_000_000
SCHEMA = 1


_KERNEL_GROUPS = (  # (group, substrings of kernel names) for the --profile breakdown, first match wins
    ("antkv coded (CUDA)", ("antkv_coded_partials",)),
    ("antkv exact + merge", ("_decode_partials_kernel", "_decode_merge_kernel")),
    ("antkv prologue + LUT", ("_decode_prologue_kernel", "_decode_lut_kernel")),
    ("antkv window flush / encode", ("window_flush", "_vq_", "encode", "_anchor", "_score", "topk", "radix", "sort")),
    ("matmul (weights)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90", "wgmma")),
    ("inductor fused", ("triton_",)),
)


def _cache_kw() -> str:
    """``cache`` or ``past_key_values``: the KV-cache keyword of this transformers' Llama (quiet on both)."""
    from .hf_compat import default_cache_keyword

    return default_cache_keyword()


def _profile_steps(step: Callable[[], None], n: int) -> dict:
    """GPU time per decode step by kernel (torch.profiler over ``n`` steps): the top kernels, a grouping by
    role, and how much of the steps' span the GPU was busy (the rest is host time the GPU waited for)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kern:
        return {"steps": n, "error": "no CUDA events recorded"}
    per: dict[str, list] = {}
    for e in kern:
        d = per.setdefault(e.name, [0.0, 0])
        d[0] += e.time_range.elapsed_us()
        d[1] += 1
    busy = sum(v[0] for v in per.values())
    span = max(e.time_range.end for e in kern) - min(e.time_range.start for e in kern)
    groups: dict[str, float] = {}
    for name, (us, _) in per.items():
        g = next((g for g, keys in _KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[g] = groups.get(g, 0.0) + us / n / 1e3
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:25]
    # host side: operators and CUDA runtime calls by self CPU time (a cudaStreamSynchronize / D2H copy here
    # is a sync that lets the GPU run dry)
    cpu = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return {"steps": n, "gpu_busy_ms_per_step": busy / n / 1e3, "span_ms_per_step": span / n / 1e3,
            "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": k[:120], "ms_per_step": v[0] / n / 1e3, "calls_per_step": v[1] / n}
                            for k, v in top],
            "cpu_total_ms_per_step": sum(e.self_cpu_time_total for e in cpu) / n / 1e3,
            "top_cpu": [{"name": e.key[:120], "self_ms_per_step": e.self_cpu_time_total / n / 1e3,
                         "total_ms_per_step": e.cpu_time_total / n / 1e3, "calls_per_step": e.count / n}
                        for e in cpu[:30]]}


def _release_stores(session, stores: dict) -> None:
    """Drop the session's references to a finished point's stores (their memory goes with the cache)."""
    for key in [k for k, s in session.stores.items() if any(s is t for t in stores.values())]:
        session.stores.pop(key, None)


def _greedy_step(fn, cache, first_ids):
    """One greedy decode step per call through ``fn`` on ``cache``, feeding back its own argmax token."""
    state = {"ids": first_ids}

    def step():
        with torch.no_grad():
            o = fn(input_ids=state["ids"], **{_cache_kw(): cache}, use_cache=True)
            state["ids"] = o.logits[:, -1:].argmax(-1)

    return step


def _emit_table(rows: list[dict], cols: list[tuple], title: str, md_title: str, md: list[str]) -> None:
    """Print one report table and add it to the markdown report (nothing when it has no rows)."""
    from .reporting import markdown_table

    if rows:
        print_table(rows, cols, title)
        md.append(md_title + "\n\n" + markdown_table(rows, cols))


def _check_errors(r: dict) -> list[float]:
    """Relative errors of a result's per-layer reference check (empty when it was not checked)."""
    chk = r.get("check") or {}
    return [v["rel_err"] for v in (chk.get("layers") or {}).values() if v.get("rel_err") is not None]


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    name: str
    label: str
    kind: str  # "dense" | "antkv"
    attn: str = "sdpa"
    bits: str | None = None


CONFIGS: dict[str, ConfigSpec] = {
    "inductor": ConfigSpec("inductor", "(a) Inductor + static bf16 cache (SDPA)", "dense", "sdpa"),
    "dense_decode": ConfigSpec("dense_decode", "(b) Inductor + flash-decoding, cache read once", "dense",
                               "antkv_dense_decode"),
    "antkv-1": ConfigSpec("antkv-1", "antkv 1 bit", "antkv", bits="1"),
    "antkv-0.375": ConfigSpec("antkv-0.375", "antkv 0.375 bit", "antkv", bits="0.375"),
}


# ------------------------------------------------------------------------------------------------ small helpers
def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def parse_size(text: str) -> int:
    from .planner import parse_bytes

    return parse_bytes(text)


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _is_oom(exc: BaseException | None, depth: int = 0) -> bool:
    """An out-of-memory error, also when wrapped (Dynamo's BackendCompilerFailed, a re-raise ``from``)."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(exc)
    if isinstance(exc, RuntimeError) and ("CUDA out of memory" in msg or "CUDA_ERROR_OUT_OF_MEMORY" in msg):
        return True
    inner = getattr(exc, "inner_exception", None)
    return _is_oom(inner, depth + 1) or _is_oom(exc.__cause__, depth + 1) or _is_oom(exc.__context__, depth + 1)


def _set_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n)


class Progress:
    """Plain progress lines (no carriage returns: the output is read from logs): at most one per ``every``
    seconds, with rate and ETA."""

    def __init__(self, total: float, label: str, unit: str = "tok", every: float = 10.0, log=print, on_line=None):
        self.total, self.label, self.unit, self.every, self.log = total, label, unit, every, log
        self.on_line = on_line
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: float) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            el = now - self.t0
            rate = self.done / el if el > 0 else float("nan")
            eta = (self.total - self.done) / rate if rate and rate == rate and rate > 0 else float("nan")
            self.log(f"    {self.label}: {self.done:,.0f}/{self.total:,.0f} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
                     f" {rate:,.0f} {self.unit}/s, {el:.0f}s elapsed, ETA {eta:.0f}s")
            if self.on_line is not None:
                self.on_line({"label": self.label, "done": self.done, "total": self.total, "unit": self.unit,
                              "rate_per_s": rate, "elapsed_s": round(el, 1)})


# ------------------------------------------------------------------------------------------------ model
def model_config(shape: str):
    """transformers config of ``shape``: 'llama3-8b' (Llama-3-8B's shape) or 'tiny' (tiny random Llama)."""
    if shape == "llama3-8b":
        from .planner import llama3_8b_config

        return llama3_8b_config()
    if shape == "tiny":
        from .models import tiny_config

        return tiny_config("llama", max_position_embeddings=1 << 23)
    raise ValueError(f"unknown --shape {shape!r}: 'llama3-8b' or 'tiny'")


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight model of ``shape`` created directly on ``device`` in ``dtype`` (no slow init): matrices
    N(0, 0.02), norm weights 1."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    config = model_config(shape)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def new_cache(model, batch: int, max_len: int, device, dtype):
    """A StaticCache allocated now (``early_initialization``), so that its position counters live on the
    device before the first compiled call."""
    from transformers import StaticCache

    from .models import kv_geometry

    g = kv_geometry(model.config)
    cache = StaticCache(config=model.config, max_cache_len=int(max_len))
    cache.early_initialization(batch_size=batch, num_heads=g.num_kv_heads, head_dim=g.head_dim, dtype=dtype,
                               device=torch.device(device))
    return cache


def set_position(cache, n: int) -> None:
    """Advance the cache's own position bookkeeping: the next forward's tokens start at position ``n``."""
    for layer in cache.layers:
        cl = layer.cumulative_length
        if isinstance(cl, torch.Tensor):
            cl.fill_(n)
        else:
            layer.cumulative_length = n
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = n


def cache_position(cache) -> int:
    return int(cache.get_seq_length())


def dense_bytes(cache) -> int:
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written over the time of one copy)."""
    cuda = device.type == "cuda"
    n = nbytes or ((1 << 30) if cuda else (1 << 24))
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
    del x, y
    return 2 * n / statistics.median(times)


# ------------------------------------------------------------------------------------------------ decode check
def _head_codebook(cb, h: int):
    from .numerics.vq import Codebook

    if cb.num_heads == 1:
        return cb
    return Codebook(cb.centroids[:, h:h + 1], cb.transform[h:h + 1], cb.inverse[h:h + 1], cb.mean[h:h + 1])


def reference_slice(store, q, k, v, batch: int = 0, kv_head: int = 0, block: int = 1 << 18):
    """fp32 reference of what ``store.attend(q, k, v)`` returns for sequence ``batch`` and the query heads of
    KV head ``kv_head`` ([1, G, T, D]), from the store's contents *before* the call, without mutating it:
    coded tokens decoded from their codes (anchors excluded), the anchors and the window plus the new tokens
    exact (causal), merged by log-sum-exp. The coded part is processed in blocks of ``block`` tokens, so a
    multi-million-token store needs a few hundred MB. Post-RoPE key codes only."""
    from .numerics.attention import causal_mask, exact_attention, merge_partials

    hkv = store.geom.num_kv_heads
    g = q.shape[1] // hkv
    t = q.shape[2]
    scale = store.geom.scale
    b, h = batch, kv_head
    qs = q[b:b + 1, h * g:(h + 1) * g]
    parts = []
    n = int(store.n_coded)
    if n:
        cbk, cbv = _head_codebook(store.cb_k, h), _head_codebook(store.cb_v, h)
        is_anchor = torch.zeros(n, dtype=torch.bool, device=q.device)
        if getattr(store, "anchor_capacity", 0):
            pos = store.anchor_pos[b, h]
            valid = pos >= 0
            if bool(valid.any()):
                is_anchor[pos[valid].long()] = True
                ak = store.anchor_k[b:b + 1, h:h + 1][:, :, valid]
                av = store.anchor_v[b:b + 1, h:h + 1][:, :, valid]
                parts.append(exact_attention(qs, ak, av, scale))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            kh = cbk.decode(store.codes_k[b:b + 1, h:h + 1, lo:hi])
            vh = cbv.decode(store.codes_v[b:b + 1, h:h + 1, lo:hi])
            vis = ~is_anchor[lo:hi]
            parts.append(exact_attention(qs, kh, vh, scale, vis[None, None, None, :]))
            del kh, vh
    wk = torch.cat([store.win_k[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1]], dim=2)
    wv = torch.cat([store.win_v[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1]], dim=2)
    n_total = len(store)
    q_pos = torch.arange(n_total, n_total + t, device=q.device)
    k_pos = torch.arange(n, n_total + t, device=q.device)
    parts.append(exact_attention(qs, wk, wv, scale, causal_mask(q_pos, k_pos)))
    out, _ = merge_partials(parts)
    return out


class DecodeChecker:
    """Wraps ``attend`` of the chosen layers' stores (instance attribute) for one compiled step: computes
    :func:`reference_slice` before the real call and compares the slice of the real output with it."""

    def __init__(self, stores: dict, layers, batch: int = 0, kv_head: int = 0):
        self.stores = {l: stores[l] for l in layers if l in stores}
        self.batch, self.kv_head = batch, kv_head
        self.results: dict[int, dict] = {}

    def __enter__(self):
        for layer, store in self.stores.items():
            orig = store.attend

            def wrapped(q, k, v, *a, _orig=orig, _layer=layer, _store=store, **kw):
                ref = None
                try:
                    if getattr(getattr(_store, "config", None), "key_space", "post_rope") == "post_rope":
                        ref = reference_slice(_store, q, k, v, self.batch, self.kv_head)
                except Exception as exc:  # noqa: BLE001 - report, do not break the step
                    self.results[_layer] = {"error": f"reference failed: {exc!r}"[:300]}
                out = _orig(q, k, v, *a, **kw)
                if ref is not None:
                    g = q.shape[1] // k.shape[1]
                    got = out[self.batch:self.batch + 1, self.kv_head * g:(self.kv_head + 1) * g].float()
                    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
                    self.results[_layer] = {"rel_err": float(err), "max_abs_err": float((got - ref).abs().max()),
                                            "ref_norm": float(ref.norm()), "position": len(_store) - k.shape[2],
                                            "finite": bool(torch.isfinite(got).all())}
                return out

            store.attend = wrapped
        return self

    def __exit__(self, *exc):
        for store in self.stores.values():
            store.__dict__.pop("attend", None)
        return False


# ------------------------------------------------------------------------------------------------ the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype)
        self.t0 = time.time()
        self.lines: list[str] = []
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out_dir = Path(args.out)
        self.name = args.name or f"e2e_bench_{args.shape}_{self.stamp}"
        self.json_path = self.out_dir / f"{self.name}.json"
        self.model = None
        self._group = None
        self._wrappers: dict = {}
        self.configs = [CONFIGS[c] for c in _split(args.configs)]
        self.results: dict[str, Any] = {
            "benchmark": "antkv_compile e2e", "schema": SCHEMA, "complete": False,
            "notes": [WEIGHTS_NOTE, CODEBOOK_NOTE],
            "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "throughput": [], "capacity": [], "prefill": [], "memory_points": [], "quality": None,
            "sections": {}, "errors": {},
        }

    # -------------------------------------------------------------- logging / saving
    def log(self, *a) -> None:
        s = " ".join(str(x) for x in a)
        if not self.args.quiet:
            print(s, flush=True)
        self.lines.append(s)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        tmp.replace(self.json_path)

    def in_progress(self, info: dict | None) -> None:
        """What a long step has done so far (kept in the JSON, so a time-out still shows the rate)."""
        self.results["in_progress"] = info
        self.save()

    def progress(self, total: float, label: str, unit: str = "tok") -> Progress:
        return Progress(total, label, unit, self.args.progress_every, self.log, self.in_progress)

    def section(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.time()
        self.log(f"== {name} ({time.time() - self.t0:.0f}s into the run)")
        try:
            fn()
            self.results["sections"][name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
        except Exception as exc:  # noqa: BLE001 - record and go on with the next part
            tb = traceback.format_exc()
            self.log(f"!! {name} failed: {exc!r}\n{tb[-2000:]}")
            self.results["errors"][name] = tb[-4000:]
            self.results["sections"][name] = {"ok": False, "seconds": round(time.time() - t0, 1)}
        finally:
            self._free()
            self.save()

    # -------------------------------------------------------------- device / memory
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def allocated(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    # -------------------------------------------------------------- set-up
    def setup(self) -> None:
        from .models import kv_geometry
        from .planner import ModelShape
        from .reporting import environment

        a = self.args
        env = environment()
        env["cuda"] = torch.version.cuda
        try:
            env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                        cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        except Exception:  # noqa: BLE001
            env["git"] = ""
        if Path(sys.argv[0]).name == "e2e_bench.py":
            env["command"] = "python " + env["command"]
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            env["gpu_total_bytes"] = total
            env["gpu_free_bytes_at_start"] = free
        self.results["environment"] = env
        self.log(f"device {env['device']}  torch {env['torch']}  transformers {env['transformers']}  triton {env['triton']}")
        self.log(f"note: {WEIGHTS_NOTE}")
        torch.manual_seed(a.seed)
        _set_recompile_limit(64)

        if a.budget == "auto":
            if self.cuda:
                free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_allocated(self.device)
                self.budget = int(free - parse_size(a.reserve))
            else:
                self.budget = parse_size("1GiB")
        else:
            self.budget = parse_size(a.budget)
        self.results["device"] = {"budget_bytes": self.budget, "budget_rule": (
            f"free device memory at start less --reserve {a.reserve}" if a.budget == "auto" else f"--budget {a.budget}")}

        bw = copy_bandwidth(self.device)
        self.copy_bw = bw
        self.results["device"]["copy_GBps"] = bw / 1e9
        self.log(f"copy bandwidth {bw / 1e9:,.0f} GB/s (read + write); planner budget {self.budget / 2**30:.2f} GiB")

        t0 = time.time()
        self.model = build_model(a.shape, self.device, self.dtype, a.seed)
        self.sync()
        cfg = self.model.config
        self.shape = ModelShape.from_config(cfg, a.shape)
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        emb = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings().weight
        tied = head.data_ptr() == emb.data_ptr()
        self.weight_bytes = params + buffers
        # per decode step the embedding table is read for B rows only (unless it is also the LM head)
        self.weight_bytes_read = params - (0 if tied else emb.numel() * emb.element_size())
        g = self.geom = kv_geometry(cfg)
        self.kv_bytes_per_token = 2 * g.num_layers * g.num_kv_heads * g.head_dim * torch.finfo(self.dtype).bits // 8
        self.results["model"] = {
            "shape": a.shape, "weights": "random (N(0, 0.02) matrices, unit norms)", "dtype": a.dtype,
            "params": self.shape.params, "weight_bytes": self.weight_bytes, "weight_bytes_read_per_step": self.weight_bytes_read,
            "layers": g.num_layers, "q_heads": g.num_q_heads, "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
            "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "rope_theta": getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta"),
            "kv_bytes_per_token_bf16": self.kv_bytes_per_token, "build_s": round(time.time() - t0, 1),
        }
        self.log(f"model {a.shape}: {self.shape.params / 1e9:.2f}B params, {self.weight_bytes / 2**30:.2f} GiB, "
                 f"built in {time.time() - t0:.1f}s")
        self.supports_capacity = _config_has("capacity")
        self.save()

    # -------------------------------------------------------------- planner
    def antkv_config(self, spec: ConfigSpec):
        from .backend import parse_options

        return parse_options(self.antkv_options(spec, None))[0]

    def memory_model(self, spec: ConfigSpec, **kw):
        from .config import get_preset
        from .planner import MemoryModel

        if spec.kind == "dense":
            return MemoryModel(self.shape, None, **kw)
        c = self.antkv_config(spec)
        return MemoryModel(self.shape, get_preset(c.bits), anchor_ratio=c.anchor_ratio, window=c.window, **kw)

    # -------------------------------------------------------------- compiled wrappers
    def _enter_group(self, key) -> None:
        """A new (configuration, capacity) group: drop every compiled graph (so no dimension that changes
        between groups -- cache length, capacity -- is turned dynamic, and the recompile limit is not shared)."""
        if key != self._group or self.args.dynamic == "static":
            torch._dynamo.reset()
            self._wrappers.clear()
            self._group = key

    def antkv_options(self, spec: ConfigSpec, capacity: int | None) -> dict:
        # check_finite would add a host sync per layer and step (isfinite(k).all()); the random inputs are finite
        opts = {"bits": spec.bits, "check_finite": False}
        opts.update(json.loads(self.args.antkv_options or "{}"))
        if capacity is not None and self.supports_capacity:
            opts["capacity"] = int(capacity)
        return opts

    def compiled(self, spec: ConfigSpec, role: str, options: dict | None = None):
        """The compiled model of ``spec`` for ``role`` ('decode' or 'prompt'; cached per group)."""
        key = (spec.name, role)
        if key in self._wrappers:
            return self._wrappers[key]
        dyn = False if self.args.dynamic == "static" else None
        if spec.kind == "dense":
            fn = torch.compile(self.model, backend=self.args.baseline_backend, dynamic=dyn)
        else:
            from .backend import antkv_backend

            inner = self.args.inner if role == "decode" else self.args.prompt_inner
            fn = torch.compile(self.model, backend=antkv_backend, options={**options, "inner": inner}, dynamic=dyn)
        self._wrappers[key] = fn
        return fn

    def set_attention(self, spec: ConfigSpec) -> None:
        if spec.attn != "sdpa":
            from . import baselines

            baselines.register()
        if self.model.config._attn_implementation != spec.attn:
            self.model.set_attn_implementation(spec.attn)

    # -------------------------------------------------------------- one measured point
    def timed_steps(self, spec: ConfigSpec, steps: int | None = None) -> int:
        """Timed decode steps of a point: antkv points time whole flush periods (every layer flushes its window
        once per ``flush`` steps), so the flushes (VQ encode + Anchor Scores + anchor selection) fall inside the
        timed steps, each counted once."""
        steps = steps or self.args.steps
        return steps if spec.kind == "dense" else _round_up(steps, self.antkv_config(spec).flush_size)

    def run_point(self, spec: ConfigSpec, batch: int, context: int, *, purpose: str, capacity: int | None = None,
                  check: bool = False, fill: str | None = None, steps: int | None = None) -> dict:
        a = self.args
        steps = self.timed_steps(spec, steps)
        extra = a.warmup + steps + (1 if check else 0) + 1
        rec: dict[str, Any] = {
            "purpose": purpose, "config": spec.name, "label": spec.label, "kind": spec.kind, "bits": spec.bits,
            "batch": batch, "context": context, "capacity": capacity or _round_up(context + extra, 64),
            "steps": steps, "warmup": a.warmup, "status": "running",
        }
        self.log(f"-- {spec.name} {purpose}: batch {batch}, context {context:,} (capacity {rec['capacity']:,})")
        t0 = time.time()
        try:
            if spec.kind == "dense":
                self._dense_point(spec, rec)
            else:
                self._antkv_point(spec, rec, check=check, fill=fill or a.fill)
            rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            if _is_oom(exc):
                rec["status"] = "oom"
                rec["peak_at_failure"] = self.peak()
                rec["reason"] = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else "out of memory"
                self.log(f"   out of memory: {rec['reason'][:160]}")
            else:
                rec["status"] = "error"
                rec["reason"] = f"{type(exc).__name__}: {exc}"[:600]
                rec["traceback"] = traceback.format_exc()[-4000:]
                self.log(f"   error: {rec['reason'][:300]}")
        finally:
            self._free()
        rec["seconds"] = round(time.time() - t0, 1)
        self.results["in_progress"] = None
        self._attach_planner(spec, rec)
        if rec["status"] == "ok":
            self.log("   " + _point_line(rec))
            prof = rec.get("profile")
            if prof and "groups_ms_per_step" in prof:
                self.log(f"   profile: GPU busy {prof['gpu_busy_ms_per_step']:.1f} of {prof['span_ms_per_step']:.1f} "
                         "ms per step; " + ", ".join(f"{g} {ms:.1f}" for g, ms in prof["groups_ms_per_step"].items()))
                for k in prof["top_kernels"][:12]:
                    self.log(f"      {k['ms_per_step']:8.2f} ms  x{k['calls_per_step']:5.0f}  {k['name'][:90]}")
                self.log(f"   host: {prof['cpu_total_ms_per_step']:.1f} ms of CPU time per step; top by self time:")
                for k in prof["top_cpu"][:16]:
                    self.log(f"      {k['self_ms_per_step']:8.2f} ms self {k['total_ms_per_step']:8.2f} total "
                             f"x{k['calls_per_step']:6.0f}  {k['name'][:80]}")
        return rec

    def _timed(self, step: Callable[[], None], steps: int, rec: dict) -> None:
        a = self.args
        t0 = time.perf_counter()
        step()
        self.sync()
        rec["first_step_s"] = round(time.perf_counter() - t0, 3)  # includes compiling the decode graph
        warm = max(0, a.warmup - 1)
        if getattr(a, "profile", False) and self.cuda and warm:
            rec["profile"] = _profile_steps(step, warm)  # the warm-up steps after the compiling one
        else:
            for _ in range(warm):
                step()
        self.sync()
        self.reset_peak()
        rec["memory_before_decode"] = self.allocated()
        if self.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(steps):
                step()
            e1.record()
            e1.synchronize()
            total_ms = e0.elapsed_time(e1)
        else:
            t1 = time.perf_counter()
            for _ in range(steps):
                step()
            total_ms = (time.perf_counter() - t1) * 1e3
        rec["step_ms"] = total_ms / steps
        rec["tokens_per_s"] = rec["batch"] / (rec["step_ms"] / 1e3)
        rec["peak_decode"] = self.peak()

    def _bound(self, rec: dict, kv_read: int) -> None:
        rec["weight_bytes_read"] = self.weight_bytes_read
        rec["kv_bytes_read"] = int(kv_read)
        rec["bound_ms"] = (self.weight_bytes_read + kv_read) / self.copy_bw * 1e3
        if rec.get("step_ms"):
            rec["bound_fraction"] = rec["bound_ms"] / rec["step_ms"]

    def _dense_point(self, spec: ConfigSpec, rec: dict) -> None:
        b, ctx, cap = rec["batch"], rec["context"], rec["capacity"]
        self.set_attention(spec)
        fn = self.compiled(spec, "decode")
        self.reset_peak()
        rec["memory_at_start"] = self.allocated()
        cache = new_cache(self.model, b, cap, self.device, self.dtype)
        with torch.no_grad():
            for layer in cache.layers:  # random bf16 K/V: no 32K prefill
                layer.keys.normal_()
                layer.values.normal_()
        set_position(cache, ctx)
        rec["fill"] = "dense cache buffers filled with random bf16 K/V, cache position set"
        step = _greedy_step(fn, cache, torch.randint(3, self.model.config.vocab_size, (b, 1), device=self.device))

        self._timed(step, rec["steps"], rec)
        if cache_position(cache) != ctx + self.args.warmup + rec["steps"]:
            raise RuntimeError(f"cache position {cache_position(cache)} after the steps, expected "
                               f"{ctx + self.args.warmup + rec['steps']}")
        self._bound(rec, b * ctx * self.kv_bytes_per_token)
        self._memory(rec, cache, None)
        self.set_attention(CONFIGS["inductor"])
        del cache, step

    def _stores_of(self, session, cache) -> dict:
        out = {}
        for i, layer in enumerate(cache.layers):
            for ident in (id(getattr(layer, "cumulative_length", None)), id(getattr(layer, "keys", None)), None):
                s = session.stores.get((i, ident))
                if s is not None:
                    out[i] = s
                    break
        if len(out) != len(cache.layers):
            raise RuntimeError(f"found antkv stores for {len(out)} of {len(cache.layers)} layers of this cache "
                               f"(session holds {len(session.stores)}): was every layer rewritten?")
        return out

    def _antkv_point(self, spec: ConfigSpec, rec: dict, *, check: bool, fill: str) -> None:
        from .backend import parse_options
        from .runtime.state import session_for

        a = self.args
        b, ctx, cap = rec["batch"], rec["context"], rec["capacity"]
        p = min(a.prompt_len, ctx)  # the prompt only starts the stores (its dense cache is B x p tokens)
        opts = self.antkv_options(spec, cap)
        session = session_for(*parse_options(dict(opts))[:2])
        rec["antkv_options"] = dict(opts)
        if fill == "store" and not hasattr(_store_class(session, self.device), "fill"):
            rec["fill_fallback"] = "the store has no fill(): real chunked prefill instead"
            fill = "prefill"
        chunk = p
        max_len = cap if not self.supports_capacity else max(p, 16)
        rec["max_cache_len"] = max_len
        self.set_attention(CONFIGS["antkv-1"])
        pre = self.compiled(spec, "prompt", opts)
        dec = self.compiled(spec, "decode", opts)
        self.reset_peak()
        rec["memory_at_start"] = self.allocated()
        cache = new_cache(self.model, b, max_len, self.device, self.dtype)
        gen = torch.Generator(device=self.device).manual_seed(a.seed + 17 * b)
        ids = torch.randint(3, self.model.config.vocab_size, (b, p), device=self.device, generator=gen)
        torch._dynamo.mark_static(ids, 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pre(input_ids=ids, **{_cache_kw(): cache}, use_cache=True, logits_to_keep=1)
        self.sync()
        rec["prompt_tokens"] = p
        rec["prompt_s"] = round(time.perf_counter() - t0, 3)  # includes the compile of the prompt graph
        stores = self._stores_of(session, cache)
        rec["store_class"] = type(next(iter(stores.values()))).__name__
        last = out.logits[:, -1:].argmax(-1)
        del out

        t0 = time.perf_counter()
        if ctx > p:
            if fill == "store":
                self._fill_stores(stores, cache, b, p, ctx, gen, rec, spec)
            else:
                last = self._fill_prefill(pre, cache, b, p, ctx, chunk, gen, rec, spec)
        self.sync()
        rec["fill_s"] = round(time.perf_counter() - t0, 3)
        if ctx > p:
            rec["fill_tokens_per_s"] = b * (ctx - p) / max(rec["fill_s"], 1e-9)
        self._filled(rec, stores, cache, ctx)
        step = _greedy_step(dec, cache, last)

        rec["flushes_per_layer_in_timed_steps"] = rec["steps"] // self.antkv_config(spec).flush_size
        self._timed(step, rec["steps"], rec)
        if check:
            self._check(rec, stores, step)
        mb = session.memory_bytes()
        per_tok = (mb["codes"] + mb["anchors"]) / max(1, rec["capacity"])
        rec["store_bytes_per_capacity_token"] = per_tok
        kv_read = self._antkv_bytes_read(spec, b, ctx)
        self._bound(rec, kv_read)
        self._memory(rec, cache, session)
        _release_stores(session, stores)
        del cache, stores, step

    def _filled(self, rec: dict, stores: dict, cache, ctx: int) -> None:
        """Every store and the cache position at ``ctx`` after a fill or prefill; the memory at that point."""
        lens = {len(s) for s in stores.values()}
        if (stores and lens != {ctx}) or cache_position(cache) != ctx:
            raise RuntimeError(f"after filling: store lengths {sorted(lens)}, cache position {cache_position(cache)}, "
                               f"expected {ctx}")
        rec["peak_fill"] = self.peak()
        rec["memory_after_fill"] = self.allocated()

    def _antkv_bytes_read(self, spec: ConfigSpec, b: int, ctx: int) -> int:
        """Bytes one decode step must read from the store: codes of ``ctx`` tokens, the anchors, the window."""
        t = self.memory_model(spec).bytes_at(b, ctx)
        return t["codes"] + t["anchors"] + t["window"]  # not the window's queries: only a flush reads them

    def _fill_stores(self, stores: dict, cache, b: int, start: int, ctx: int, gen, rec: dict, spec) -> None:
        a = self.args
        g = self.geom
        t_chunk = a.fill_chunk or max(16, min(4096, a.fill_rows // b) // 16 * 16)
        rec["fill"] = (f"store.fill(q, k, v): the real encode path, {t_chunk} tokens per sequence per call, random "
                       f"{a.dtype} q/k/v (shared by the {len(stores)} layers), then cache position set to the context")
        rec["fill_chunk"] = t_chunk
        prog = self.progress(b * (ctx - start), f"{spec.name} B={b} fill: sequence-tokens (x {len(stores)} layers)")
        n = start
        with torch.no_grad():
            while n < ctx:
                t = min(t_chunk, ctx - n)
                q = torch.randn(b, g.num_q_heads, t, g.head_dim, device=self.device, dtype=self.dtype, generator=gen)
                k = torch.randn(b, g.num_kv_heads, t, g.head_dim, device=self.device, dtype=self.dtype, generator=gen)
                v = torch.randn(b, g.num_kv_heads, t, g.head_dim, device=self.device, dtype=self.dtype, generator=gen)
                for layer in sorted(stores):
                    stores[layer].fill(q, k, v)
                n += t
                if prog.every <= 0 or time.perf_counter() - prog.last >= prog.every or n >= ctx:
                    self.sync()
                prog.update(b * t)
        set_position(cache, ctx)

    def _fill_prefill(self, fn, cache, b: int, start: int, ctx: int, chunk: int, gen, rec: dict, spec):
        """Real chunked prefill through the compiled model (the fallback when the store has no ``fill``)."""
        a = self.args
        rec["fill"] = f"real chunked prefill through the compiled model, {chunk} tokens per forward"
        rec["fill_chunk"] = chunk
        prog = self.progress(b * (ctx - start), f"{spec.name} B={b} prefill")
        n, last = start, None
        with torch.no_grad():
            while n < ctx:
                t = min(chunk, ctx - n)
                ids = torch.randint(3, self.model.config.vocab_size, (b, t), device=self.device, generator=gen)
                torch._dynamo.mark_static(ids, 1)
                out = fn(input_ids=ids, **{_cache_kw(): cache}, use_cache=True, logits_to_keep=1)
                last = out.logits[:, -1:].argmax(-1)
                del out
                n += t
                prog.update(b * t)
        return last

    def _check(self, rec: dict, stores: dict, step) -> None:
        layers = sorted({(int(x) % len(stores)) for x in _split(self.args.check_layers)})
        with DecodeChecker(stores, layers) as chk:
            step()
        self.sync()
        res = chk.results
        tol = self.args.check_tol
        ok = bool(res) and all(r.get("rel_err", math.inf) <= tol and r.get("finite", False) for r in res.values())
        rec["check"] = {
            "what": ("one more compiled decode step: attention output of sequence 0, KV head 0's query heads, vs an "
                     "fp32 reference from the store's contents (decoded codes without anchors + anchors + window)"),
            "layers": {str(k): v for k, v in res.items()}, "bound_rel_err": tol, "ok": ok,
        }
        if not res:
            rec["check"]["note"] = "the wrapped store.attend was not called (the op reached the store another way)"
        self.log(f"   check vs reference: " + ", ".join(f"layer {k} rel {v.get('rel_err', float('nan')):.2e}" for k, v in res.items())
                 + f" (bound {tol:g}) -> {'ok' if ok else 'FAILED'}")

    def _memory(self, rec: dict, cache, session) -> None:
        m: dict[str, Any] = {"weights": self.weight_bytes}
        if session is not None:
            mb = session.memory_bytes()
            m.update({k: int(v) for k, v in mb.items()})
        else:
            m.update({"codes": 0, "anchors": 0, "window_kv": 0, "window_queries": 0, "codebooks": 0})
        m["window"] = m["window_kv"] + m["window_queries"]
        m["dense_kv"] = dense_bytes(cache)
        m["cache_total"] = m["codes"] + m["anchors"] + m["window"] + m["codebooks"] + m["dense_kv"]
        m["accounted"] = m["weights"] + m["cache_total"]
        m["bf16_cache_equivalent"] = rec["batch"] * rec["capacity"] * self.kv_bytes_per_token
        if self.cuda:
            self.sync()
            gc.collect()
            m["allocated"] = self.allocated()
            # what this point allocated and still holds, beyond its cache: must be ~0 (no hidden cache copy);
            # measured against the allocation at the point's start (weights + the process's persistent
            # buffers, e.g. cuBLAS workspaces), which is reported separately
            start = rec.get("memory_at_start")
            m["persistent_non_weight"] = None if start is None else start - m["weights"]
            m["unaccounted"] = m["allocated"] - (start if start is not None else m["weights"]) - m["cache_total"]
            m["peak_fill"] = rec.get("peak_fill")
            m["peak_decode"] = rec.get("peak_decode")
            m["peak"] = max(x for x in (rec.get("peak_fill"), rec.get("peak_decode"), m["allocated"]) if x is not None)
            if rec.get("memory_before_decode") is not None and rec.get("peak_decode") is not None:
                m["workspace_decode"] = rec["peak_decode"] - rec["memory_before_decode"]
            if rec.get("peak_fill") is not None and rec.get("memory_after_fill") is not None:
                m["workspace_fill"] = rec["peak_fill"] - min(rec["memory_after_fill"], rec["peak_fill"])
            m["workspace"] = m["peak"] - m["allocated"]
            limit = max(128 << 20, int(0.02 * m["cache_total"]))
            m["unaccounted_limit"] = limit
            m["no_hidden_cache"] = abs(m["unaccounted"]) <= limit
        rec["memory"] = m

    def _attach_planner(self, spec: ConfigSpec, rec: dict) -> None:
        try:
            mm = self.memory_model(spec)
            pred = mm.bytes_at(rec["batch"], rec["capacity"])
        except Exception as exc:  # noqa: BLE001
            rec["planner"] = {"error": repr(exc)[:300]}
            return
        pl: dict[str, Any] = {"terms": pred, "total": pred["total"], "budget": self.budget,
                              "fits_budget": pred["total"] <= self.budget}
        m = rec.get("memory") or {}
        if m.get("peak"):
            pl["measured_peak"] = m["peak"]
            pl["peak_over_predicted"] = m["peak"] / pred["total"]
            pl["peak_within_prediction"] = m["peak"] <= pred["total"]
            steady = {"weights": m["weights"], "codes": m["codes"], "anchors": m["anchors"], "window": m["window_kv"],
                      "window_queries": m["window_queries"], "codebooks": m["codebooks"],
                      "kv_full_precision": m["dense_kv"]}
            pl["measured_over_predicted"] = {k: (steady[k] / pred[k] if pred.get(k) else None)
                                             for k in steady if k in pred}
        rec["planner"] = pl

    # -------------------------------------------------------------- runs
    def _batches(self, pmax: int) -> list[int]:
        return batch_list(self.args.batches, pmax, self.args.max_batch)

    def run_throughput(self) -> None:
        a = self.args
        for spec in self.configs:
            if not self._available(spec):
                continue
            for ctx in [int(x) for x in _split(a.contexts)]:
                cap = _round_up(ctx + a.warmup + self.timed_steps(spec) + 2, 64)
                self._enter_group((spec.name, "throughput", ctx))
                pmax = self.memory_model(spec).largest_batch(cap, self.budget)
                batches = self._batches(pmax)
                self.log(f"[throughput] {spec.label} at {ctx:,}: planner's largest batch {pmax}; batches {batches}")
                for b in batches:
                    if b > pmax and not a.no_planner_skip:
                        rec = {"purpose": "throughput", "config": spec.name, "label": spec.label, "kind": spec.kind,
                               "bits": spec.bits, "batch": b, "context": ctx, "capacity": cap, "status": "skipped",
                               "reason": f"planner: does not fit {self.budget / 2**30:.1f} GiB (largest batch {pmax})"}
                        self._attach_planner(spec, rec)
                        self.results["throughput"].append(rec)
                        self.save()
                        continue
                    rec = self.run_point(spec, b, ctx, purpose="throughput")
                    rec["planner_largest_batch"] = pmax
                    self.results["throughput"].append(rec)
                    self.save()
                    if rec["status"] in ("oom", "error"):
                        break

    def run_capacity(self) -> None:
        a = self.args
        for spec in [CONFIGS[c] for c in _split(a.capacity_configs)]:
            if not self._available(spec):
                continue
            if spec.kind != "antkv":
                self.log(f"[capacity] {spec.name}: the capacity run is for antkv configurations; skipped")
                continue
            extra = a.warmup + self.timed_steps(spec) + 3
            mm = self.memory_model(spec)
            planner_longest = mm.longest_context(1, self.budget)
            if a.capacity_context:
                cap = int(a.capacity_context) + extra
            else:
                cap = mm.longest_context(1, self.budget - parse_size(a.capacity_margin))
                cap = max(cap // 1024 * 1024, 1024)
            full_longest = self.memory_model(CONFIGS["inductor"]).longest_context(1, self.budget)
            for attempt in range(a.capacity_retries + 1):
                ctx = cap - extra
                self._enter_group((spec.name, "capacity", cap))
                self.log(f"[capacity] {spec.label}: context {ctx:,} (store capacity {cap:,}; planner's longest at "
                         f"batch 1 {planner_longest:,}; bf16 cache: {full_longest:,})")
                store_cls = self._store_class_for(spec, cap)
                if not hasattr(store_cls, "fill") and ctx > a.max_prefill_fill:
                    rec = {"purpose": "capacity", "config": spec.name, "status": "skipped", "batch": 1,
                           "context": ctx, "capacity": cap,
                           "reason": f"{store_cls.__name__} has no fill(); a real prefill of {ctx:,} tokens is too slow"}
                    self.results["capacity"].append(rec)
                    break
                rec = self.run_point(spec, 1, ctx, purpose="capacity", capacity=cap, check=True)
                rec["planner_longest_context"] = planner_longest
                rec["bf16_planner_longest_context"] = full_longest
                rec["target_context"] = TARGET_CAPACITY
                rec["attempt"] = attempt
                m = rec.get("memory") or {}
                if rec["status"] == "ok" and m.get("peak") and rec.get("store_bytes_per_capacity_token"):
                    head = self.budget - m["peak"]
                    rec["headroom_bytes"] = head
                    rec["implied_longest_context"] = int(cap + head / rec["store_bytes_per_capacity_token"])
                rec["target_met"] = rec["status"] == "ok" and ctx >= TARGET_CAPACITY and (rec.get("check") or {}).get("ok", False)
                self.results["capacity"].append(rec)
                self.save()
                if rec["status"] != "oom":
                    break
                cap = int(cap * 0.9) // 1024 * 1024

    def run_prefill(self) -> None:
        a = self.args
        for spec in [CONFIGS[c] for c in _split(a.prefill_configs)]:
            if not self._available(spec):
                continue
            ctx, chunk = a.prefill_context, a.prefill_chunk
            if ctx % chunk:
                ctx = _round_up(ctx, chunk)
            cap = _round_up(ctx + a.warmup + self.timed_steps(spec) + 3, 64)
            self._enter_group((spec.name, "prefill", cap))
            self.log(f"[prefill] {spec.label}: chunked prefill of {ctx:,} tokens, {chunk} per forward, then decode")
            rec = {"purpose": "prefill", "config": spec.name, "label": spec.label, "kind": spec.kind, "bits": spec.bits,
                   "batch": 1, "context": ctx, "capacity": cap, "chunk": chunk, "steps": self.timed_steps(spec), "warmup": a.warmup,
                   "status": "running"}
            t0 = time.time()
            try:
                self._prefill_point(spec, rec)
                rec["status"] = "ok"
            except Exception as exc:  # noqa: BLE001
                rec["status"] = "oom" if _is_oom(exc) else "error"
                rec["reason"] = f"{type(exc).__name__}: {exc}"[:600]
                if rec["status"] == "error":
                    rec["traceback"] = traceback.format_exc()[-4000:]
                self.log(f"   {rec['status']}: {rec['reason'][:300]}")
            finally:
                self._free()
            rec["seconds"] = round(time.time() - t0, 1)
            self._attach_planner(spec, rec)
            if rec["status"] == "ok":
                self.log("   " + _point_line(rec))
            self.results["prefill"].append(rec)
            self.save()

    def _prefill_point(self, spec: ConfigSpec, rec: dict) -> None:
        from .backend import parse_options
        from .runtime.state import session_for

        a = self.args
        ctx, chunk, cap = rec["context"], rec["chunk"], rec["capacity"]
        session = None
        if spec.kind == "antkv":
            opts = self.antkv_options(spec, cap)
            session = session_for(*parse_options(dict(opts))[:2])
            rec["antkv_options"] = dict(opts)
            self.set_attention(CONFIGS["antkv-1"])
            fn = self.compiled(spec, "decode", opts)  # the chunks and the steps: inner = --inner (Inductor)
            max_len = chunk if self.supports_capacity else cap
        else:
            self.set_attention(spec)
            fn = self.compiled(spec, "decode")
            max_len = cap
        rec["max_cache_len"] = max_len
        gen = torch.Generator(device=self.device).manual_seed(a.seed + 5)
        vocab = self.model.config.vocab_size

        def chunk_ids(n):
            ids = torch.randint(3, vocab, (1, n), device=self.device, generator=gen)
            torch._dynamo.mark_static(ids, 1)
            return ids

        # warm-up on a throw-away cache: compiles the chunk graph and the decode graph
        t0 = time.perf_counter()
        with torch.no_grad():
            warm = new_cache(self.model, 1, max_len, self.device, self.dtype)
            o = fn(input_ids=chunk_ids(chunk), **{_cache_kw(): warm}, use_cache=True, logits_to_keep=1)
            for _ in range(2):
                o = fn(input_ids=o.logits[:, -1:].argmax(-1), **{_cache_kw(): warm}, use_cache=True)
            self.sync()
            if session is not None:  # the session would keep the throw-away cache's stores for the next cache
                _release_stores(session, self._stores_of(session, warm))
            del o, warm
        self._free()
        rec["compile_warmup_s"] = round(time.perf_counter() - t0, 1)

        self.reset_peak()
        rec["memory_at_start"] = self.allocated()
        cache = new_cache(self.model, 1, max_len, self.device, self.dtype)
        prog = self.progress(ctx, f"{spec.name} chunked prefill")
        chunk_ms = []
        last = None
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(ctx // chunk):
                t1 = time.perf_counter()
                out = fn(input_ids=chunk_ids(chunk), **{_cache_kw(): cache}, use_cache=True, logits_to_keep=1)
                last = out.logits[:, -1:].argmax(-1)
                del out
                self.sync()
                chunk_ms.append((time.perf_counter() - t1) * 1e3)
                prog.update(chunk)
            rec["prefill_s"] = round(time.perf_counter() - t0, 3)
        rec["prefill_tokens_per_s"] = ctx / rec["prefill_s"]
        rec["chunk_ms_first_last"] = [round(chunk_ms[0], 2), round(chunk_ms[-1], 2)]
        rec["fill"] = f"real chunked prefill through the compiled model, {chunk} tokens per forward"
        stores = self._stores_of(session, cache) if session is not None else {}
        self._filled(rec, stores, cache, ctx)
        step = _greedy_step(fn, cache, last)

        self._timed(step, rec["steps"], rec)
        if stores:
            self._check(rec, stores, step)
            self._bound(rec, self._antkv_bytes_read(spec, 1, ctx))
        else:
            self._bound(rec, ctx * self.kv_bytes_per_token)
        self._memory(rec, cache, session)
        if session is not None:
            _release_stores(session, stores)
        del cache, stores, step

    def run_memory(self) -> None:
        """One point per configuration at (--memory-batch, first --contexts) unless already measured."""
        a = self.args
        b, ctx = a.memory_batch, int(_split(a.contexts)[0])
        for spec in self.configs:
            if not self._available(spec):
                continue
            done = [r for r in self.results["throughput"] if r["config"] == spec.name and r["batch"] == b
                    and r["context"] == ctx and r["status"] == "ok"]
            if done:
                self.log(f"[memory] {spec.name}: batch {b}, context {ctx:,} already measured by the throughput run")
                continue
            self._enter_group((spec.name, "throughput", ctx))
            rec = self.run_point(spec, b, ctx, purpose="memory")
            self.results["memory_points"].append(rec)
            self.save()

    def run_quality(self) -> None:
        """The quality hook: ``ANTKV_BENCH_QUALITY_HOOK`` = ``module:function`` or ``path/to/file.py:function``;
        by default the first of ``antkv_compile.gpu_quality:run`` and ``benchmarks/gpu_quality.py:run`` that
        exists. Called as ``function(device=..., progress=...)``; returns a JSON-able dict (kept under
        ``quality``; its ``summary`` entry, if any, is printed)."""
        hooks = [os.environ["ANTKV_BENCH_QUALITY_HOOK"]] if os.environ.get("ANTKV_BENCH_QUALITY_HOOK") else [
            "antkv_compile.gpu_quality:run", str(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_quality.py") + ":run"]
        fn, tried = None, []
        for hook in hooks:
            try:
                fn = _load_hook(hook)
                break
            except (ImportError, AttributeError, FileNotFoundError) as exc:
                tried.append(f"{hook}: {exc!r}"[:300])
        if fn is None:
            self.results["quality"] = {"status": "not available", "tried": tried}
            self.log(f"[quality] no hook available ({'; '.join(tried)}); skipped")
            return
        self.log(f"[quality] running {hook}")
        res = fn(device=str(self.device), progress=not self.args.quiet)
        self.results["quality"] = {"status": "ok", "hook": hook, "result": res}

    # -------------------------------------------------------------- availability
    def _available(self, spec: ConfigSpec) -> bool:
        if spec.attn != "sdpa":
            try:
                from . import baselines  # noqa: F401
            except ImportError as exc:
                self._record_unavailable(spec, f"antkv_compile.baselines is not importable ({exc!r})")
                return False
        return True

    def _record_unavailable(self, spec: ConfigSpec, reason: str) -> None:
        self.log(f"!! {spec.name} unavailable: {reason}")
        self.results.setdefault("unavailable", {})[spec.name] = reason

    def _store_class_for(self, spec: ConfigSpec, cap: int):
        from .backend import parse_options
        from .runtime.state import session_for

        session = session_for(*parse_options(self.antkv_options(spec, cap))[:2])
        return _store_class(session, self.device)

    # -------------------------------------------------------------- summary / report
    def summarize(self) -> dict:
        tp = [r for r in self.results["throughput"] if r.get("status") == "ok"]
        best: dict[str, dict] = {}
        for r in tp:
            key = f"{r['config']}@{r['context']}"
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = {"config": r["config"], "context": r["context"], "batch": r["batch"],
                             "tokens_per_s": r["tokens_per_s"], "step_ms": r["step_ms"],
                             "bound_fraction": r.get("bound_fraction")}
        largest: dict[str, dict] = {}
        for r in self.results["throughput"]:
            key = f"{r['config']}@{r['context']}"
            d = largest.setdefault(key, {"measured_largest_batch": 0, "planner_largest_batch": r.get("planner_largest_batch"),
                                         "first_oom_batch": None})
            if r.get("status") == "ok":
                d["measured_largest_batch"] = max(d["measured_largest_batch"], r["batch"])
            if r.get("status") == "oom" and d["first_oom_batch"] is None:
                d["first_oom_batch"] = r["batch"]
            if r.get("planner_largest_batch") is not None:
                d["planner_largest_batch"] = r["planner_largest_batch"]
        ratios = {}
        for key, v in best.items():
            ctx = v["context"]
            b_ = best.get(f"dense_decode@{ctx}")
            a_ = best.get(f"inductor@{ctx}")
            ratios[key] = {"vs_dense_decode": v["tokens_per_s"] / b_["tokens_per_s"] if b_ else None,
                           "vs_inductor": v["tokens_per_s"] / a_["tokens_per_s"] if a_ else None}
        targets = {}
        for key, r in ratios.items():
            if key.startswith("antkv") and r["vs_dense_decode"] is not None:
                targets[f"throughput {key} >= {TARGET_SPEEDUP:g}x (b)"] = r["vs_dense_decode"] >= TARGET_SPEEDUP
        for r in self.results["capacity"]:
            if r.get("bits") == "1":
                targets[f"capacity {r['config']} >= {TARGET_CAPACITY:,} tokens, checked"] = bool(r.get("target_met"))
        planner_rows = []
        for r in self._all_points():
            pl = r.get("planner") or {}
            if r.get("status") == "ok" and pl.get("measured_peak"):
                planner_rows.append({"what": f"{r['purpose']} {r['config']} B={r['batch']} N={r['capacity']:,}",
                                     "predicted": pl["total"], "measured_peak": pl["measured_peak"],
                                     "ratio": pl["peak_over_predicted"], "within": pl["peak_within_prediction"]})
        hidden = [r["memory"]["no_hidden_cache"] for r in self._all_points()
                  if r.get("status") == "ok" and "no_hidden_cache" in (r.get("memory") or {})]
        s = {"best": best, "ratios": ratios, "largest_batch": largest, "targets": targets,
             "planner_vs_measured": planner_rows,
             "no_hidden_full_precision_cache": all(hidden) if hidden else None}
        self.results["summary"] = s
        return s

    def _all_points(self) -> list[dict]:
        r = self.results
        return [*r["throughput"], *r["memory_points"], *r["capacity"], *r["prefill"]]

    def report(self) -> str:
        s = self.summarize()
        md = []
        title_note = f"{self.args.shape} shape, {WEIGHTS_NOTE}"
        rows = []
        for key, v in s["best"].items():
            lb = s["largest_batch"].get(key, {})
            rows.append({"config": v["config"], "context": v["context"], "batch": v["batch"],
                         "tok_s": v["tokens_per_s"], "step_ms": v["step_ms"], "bound": v.get("bound_fraction"),
                         "max_b": lb.get("measured_largest_batch"), "plan_b": lb.get("planner_largest_batch"),
                         "oom_b": lb.get("first_oom_batch"),
                         "x_b": s["ratios"][key]["vs_dense_decode"], "x_a": s["ratios"][key]["vs_inductor"]})
        cols = [("config", "method", "s"), ("context", "context", ","), ("batch", "best batch", "d"),
                ("tok_s", "tokens/s", ",.1f"), ("step_ms", "ms/step", ".2f"), ("bound", "x bound", ".2f"),
                ("max_b", "largest batch run", "d"), ("oom_b", "first OOM", "d"), ("plan_b", "planner largest", "d"),
                ("x_b", "x (b)", ".2f"), ("x_a", "x (a)", ".2f")]
        _emit_table(rows, cols, f"Decode throughput (best batch of each; {title_note})", "Decode throughput", md)
        rows = []
        for r in self.results["capacity"]:
            errs = _check_errors(r)
            rows.append({"config": r["config"], "status": r["status"], "context": r["context"], "capacity": r["capacity"],
                         "step_ms": r.get("step_ms"), "fill_tps": r.get("fill_tokens_per_s"), "fill_s": r.get("fill_s"),
                         "rel": max(errs) if errs else None, "plan": r.get("planner_longest_context"),
                         "implied": r.get("implied_longest_context"), "fp": r.get("bf16_planner_longest_context"),
                         "met": "yes" if r.get("target_met") else "no"})
        cols = [("config", "method", "s"), ("status", "status", "s"), ("context", "context run", ","),
                ("capacity", "store capacity", ","), ("step_ms", "ms/step", ".2f"), ("fill_tps", "fill tok/s", ",.0f"),
                ("fill_s", "fill s", ".0f"), ("rel", "check rel err", ".1e"), ("plan", "planner longest", ","),
                ("implied", "headroom-implied longest", ","), ("fp", "bf16 cache longest", ","),
                ("met", f">= {TARGET_CAPACITY / 1e6:g}M + check", "s")]
        _emit_table(rows, cols, f"Capacity at batch 1 ({title_note})", "Capacity", md)
        rows = []
        for r in self.results["prefill"]:
            errs = _check_errors(r)
            rows.append({"config": r["config"], "status": r["status"], "context": r["context"], "chunk": r.get("chunk"),
                         "prefill_s": r.get("prefill_s"), "tps": r.get("prefill_tokens_per_s"),
                         "step_ms": r.get("step_ms"), "rel": max(errs) if errs else None,
                         "peak": _gib((r.get("memory") or {}).get("peak"))})
        cols = [("config", "method", "s"), ("status", "status", "s"), ("context", "context", ","), ("chunk", "chunk", "d"),
                ("prefill_s", "prefill s", ".1f"), ("tps", "prefill tok/s", ",.0f"), ("step_ms", "decode ms/step", ".2f"),
                ("rel", "check rel err", ".1e"), ("peak", "peak GiB", "s")]
        _emit_table(rows, cols, f"Chunked prefill + decode ({title_note})", "Chunked prefill + decode", md)
        rows = []
        pts = [r for r in self._all_points() if r.get("status") == "ok" and r.get("memory")]
        big = max([r["memory"].get("peak") or r["memory"]["accounted"] for r in pts] or [0]) >= 2**30
        unit, div = ("GiB", 2**30) if big else ("MiB", 2**20)

        def u(x):
            return "-" if x is None else f"{x / div:,.2f}"

        for r in pts:
            m = r["memory"]
            rows.append({"what": r["config"], "run": r["purpose"], "batch": r["batch"], "capacity": r["capacity"],
                         "weights": u(m["weights"]), "codes": u(m["codes"]), "anchors": u(m["anchors"]),
                         "window": u(m["window"]), "codebooks": u(m["codebooks"]), "dense": u(m["dense_kv"]),
                         "workspace": u(m.get("workspace_decode")), "peak": u(m.get("peak")),
                         "unacc": u(m.get("unaccounted")), "plan": u((r.get("planner") or {}).get("total")),
                         "ratio": (r.get("planner") or {}).get("peak_over_predicted")})
        cols = [("what", "method", "s"), ("run", "run", "s"), ("batch", "B", "d"), ("capacity", "tokens", ","),
                ("weights", "weights", "s"),
                ("codes", "codes", "s"), ("anchors", "anchors", "s"), ("window", "window", "s"),
                ("codebooks", "codebooks", "s"), ("dense", "dense cache", "s"), ("workspace", "decode workspace", "s"),
                ("peak", "peak", "s"), ("unacc", "unaccounted", "s"), ("plan", "planner total", "s"),
                ("ratio", "peak / planner", ".3f")]
        _emit_table(rows, cols, f"Memory accounting, {unit} ({title_note})", f"Memory accounting ({unit})", md)
        q = self.results.get("quality")
        lines = [f"notes: {WEIGHTS_NOTE}; {CODEBOOK_NOTE}"]
        fills = sorted({f"{r['purpose']}: {r['fill']}" for r in self._all_points() if r.get("kind") == "antkv" and r.get("fill")})
        lines += [f"antkv context filled by {f}" for f in fills]
        if q:
            lines.append(f"quality: {json.dumps(q, default=_json_default)[:600]}")
        for k, v in s["targets"].items():
            lines.append(f"target {k}: {'met' if v else 'NOT met'}")
        if s["no_hidden_full_precision_cache"] is not None:
            lines.append(f"steady allocation = accounted bytes at every point (no hidden full-precision cache): "
                         f"{'yes' if s['no_hidden_full_precision_cache'] else 'NO'}")
        bad = [k for k, v in self.results["sections"].items() if not v["ok"]]
        lines.append(f"sections failed: {bad}")
        lines.append(f"results: {self.json_path}")
        for line in lines:
            print(line, flush=True)
        md.append("\n".join(lines))
        self.results["markdown"] = "\n\n".join(md)
        return self.results["markdown"]

    def plots(self) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        tp = [r for r in self.results["throughput"] if r.get("status") == "ok"]
        if tp:
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            for key in sorted({(r["config"], r["context"]) for r in tp}):
                rr = sorted((r for r in tp if (r["config"], r["context"]) == key), key=lambda r: r["batch"])
                ax.plot([r["batch"] for r in rr], [r["tokens_per_s"] for r in rr], marker="o",
                        label=f"{CONFIGS[key[0]].label} @ {key[1] // 1024}K")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"{self.args.shape} ({WEIGHTS_NOTE})\n{self.results['environment']['device']}", fontsize=8)
            written.append(self._save_plot(plt, fig, ax, "throughput", legend_size=7))
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        ns = [2**k for k in range(10, 24)]
        specs = [CONFIGS["inductor"], *[c for c in CONFIGS.values() if c.kind == "antkv"]]
        for spec in specs:
            try:
                mm = self.memory_model(spec)
                ax.plot(ns, [mm.bytes_at(1, n)["total"] / 2**30 for n in ns], "--",
                        label=f"planner, batch 1: {'bf16 cache' if spec.kind == 'dense' else spec.label}")
            except Exception:  # noqa: BLE001
                pass
        pts = [r for r in self._all_points() if r.get("status") == "ok" and r["batch"] == 1 and (r.get("memory") or {}).get("peak")]
        for cfg in sorted({r["config"] for r in pts}):
            rr = sorted((r for r in pts if r["config"] == cfg), key=lambda r: r["capacity"])
            ax.plot([r["capacity"] for r in rr], [r["memory"]["peak"] / 2**30 for r in rr], "o",
                    label=f"measured peak: {CONFIGS[cfg].label}")
        ax.axhline(self.budget / 2**30, color="gray", lw=0.8, label="budget")
        top = max([self.budget / 2**30] + [r["memory"]["peak"] / 2**30 for r in pts])
        ax.set_ylim(0, 1.3 * top)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per sequence), batch 1")
        ax.set_ylabel("device memory (GiB)")
        ax.set_title(f"memory vs context, {self.args.shape} ({WEIGHTS_NOTE})", fontsize=8)
        written.append(self._save_plot(plt, fig, ax, "memory", legend_size=6))
        return written

    def _save_plot(self, plt, fig, ax, kind: str, legend_size: int) -> str:
        """Grid, legend, tight layout; write ``<name>_<kind>.png`` beside the JSON and return its path."""
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        p = self.out_dir / f"{self.name}_{kind}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        return str(p)


# ------------------------------------------------------------------------------------------------ module helpers
def batch_list(spec: str, pmax: int, max_batch: int) -> list[int]:
    """Batch sizes of a sweep. ``spec``: 'auto' (1, 2, 4, ... up to min(pmax, max_batch), then that one) or a
    comma list where 'max' stands for min(pmax, max_batch); pmax = the planner's largest batch."""
    top = min(pmax, max_batch)
    if spec != "auto":
        return sorted({(top if x == "max" else int(x)) for x in _split(spec) if x != "max" or top > 0})
    out, b = [], 1
    while b <= max(top, 1):
        out.append(b)
        b *= 2
    if top > 0 and top not in out:
        out.append(top)
    return out


def _load_hook(hook: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function (ImportError/AttributeError if absent)."""
    import importlib
    import importlib.util

    target, _, name = hook.rpartition(":") if hook.count(":") else (hook, "", "run")
    name = name or "run"
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise FileNotFoundError(str(path))
        spec = importlib.util.spec_from_file_location(f"_antkv_quality_hook_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def _split(text) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(x) for x in text]
    return [x.strip() for x in str(text).split(",") if x.strip()]


def _config_has(field: str) -> bool:
    from .config import AnTKVConfig

    return field in {f.name for f in dataclasses.fields(AnTKVConfig)}


def _store_class(session, device):
    """The layer-store class the session will create on ``device``."""
    if hasattr(session, "store_kind"):
        if session.store_kind(torch.device(device)) == "kernels":
            from .runtime.kernel_store import KernelLayerStore

            return KernelLayerStore
    from .numerics.store import AnTKVLayerStore

    return AnTKVLayerStore


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str, width: int = 200) -> None:
    """A rich table (as :func:`antkv_compile.reporting.print_table`, wider: the memory table has 15 columns)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="left" if header in ("method", "run", "status") else "right")
    for r in rows:
        table.add_row(*[format(r.get(k), fmt) if r.get(k) is not None else "-" for k, _, fmt in columns])
    Console(width=width).print(table)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def _point_line(r: dict) -> str:
    m = r.get("memory") or {}
    parts = []
    if r.get("step_ms") is not None:
        parts.append(f"{r['step_ms']:.2f} ms/step, {r['tokens_per_s']:,.1f} tok/s")
    if r.get("bound_fraction") is not None:
        parts.append(f"{r['bound_fraction']:.2f} of the bandwidth bound")
    if r.get("first_step_s") is not None:
        parts.append(f"first step {r['first_step_s']:.1f}s")
    if r.get("fill_s"):
        parts.append(f"fill {r['fill_s']:.1f}s")
    if r.get("prefill_s"):
        parts.append(f"prefill {r['prefill_s']:.1f}s ({r['prefill_tokens_per_s']:,.0f} tok/s)")
    if m.get("peak") is not None:
        pl = r.get("planner") or {}
        parts.append(f"peak {m['peak'] / 2**30:.2f} GiB (planner {pl.get('total', 0) / 2**30:.2f})"
                     f", unaccounted {m['unaccounted'] / 2**20:.0f} MiB")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ command line
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
    # memory once the window buffers were preallocated at full size (NOTES.md "v7")
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
    p.add_argument("--quiet", action="store_true")


def plan_only(args) -> int:
    """What a run would do, from the planner alone (no device, no model)."""
    from .planner import MemoryModel, ModelShape
    from .config import get_preset

    if args.budget == "auto":
        raise SystemExit("--plan-only needs --budget (e.g. 79GiB)")
    budget = parse_size(args.budget)
    shape = ModelShape.from_config(model_config(args.shape), args.shape)
    out = {"budget": budget, "throughput": {}, "capacity": {}}
    runs = _split(args.runs)
    for name in _split(args.configs):
        spec = CONFIGS[name]
        mm = MemoryModel(shape, get_preset(spec.bits) if spec.bits else None)
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
        mm = MemoryModel(shape, get_preset(spec.bits))
        cap = args.capacity_context or mm.longest_context(1, budget - parse_size(args.capacity_margin)) // 1024 * 1024
        out["capacity"][name] = {"context": cap, "planner_longest": mm.longest_context(1, budget)}
        if "capacity" in runs:
            print(f"capacity   {name:12s} context {cap:,} (planner's longest {mm.longest_context(1, budget):,})")
    print(json.dumps(out, indent=1))
    return 0


def merge(args) -> int:
    """Combine the JSON files of several calls (the GPU work split into calls of <= 10 minutes) into one
    report: tables, plots and a merged JSON (``--name``, default e2e_bench_merged_<date>)."""
    from .planner import ModelShape

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
    bench.results["quality"] = next((d["quality"] for d in data if d.get("quality")), None)
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
             "memory": bench.run_memory, "quality": bench.run_quality}
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
    # NOTES.md "v7"); read at the first CUDA allocation, so set before any
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*no codebook artifact.*")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
