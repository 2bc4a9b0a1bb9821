"""Constants, configurations and small helpers of the end-to-end benchmark."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

WEIGHTS_NOTE = "random bf16 weights: speed and memory do not depend on the weight values"
CODEBOOK_NOTE = ("antkv: no codebook artifact, codebooks learned from the first prefill's own keys/values "
                 "(speed and memory do not depend on the codebook values)")
ARTIFACT_NOTE = ("antkv: codebooks from the artifact given in --antkv-options (speed and memory do not depend on the "
                 "codebook values)")


def codebook_note(antkv_options: str | None) -> str:
    """The note on where the benchmark's codebooks come from."""
    import json

    return ARTIFACT_NOTE if "artifact" in json.loads(antkv_options or "{}") else CODEBOOK_NOTE
RUNS = ("throughput", "capacity", "prefill128k", "memory")
DEFAULT_RUNS = "throughput,capacity,prefill128k,memory"
TARGET_SPEEDUP = 5.0
TARGET_CAPACITY = 4_000_000
SCHEMA = 1


_KERNEL_GROUPS = (  # (group, substrings of kernel names) for the --profile breakdown, first match wins
    ("antkv coded, pre-RoPE", ("antkv_rope_coded", "_rope_coded_kernel")),
    ("antkv split programs + merge", ("_decode_partials_kernel",)),
    ("antkv prologue + LUT", ("_decode_prologue_kernel", "_decode_lut_kernel")),
    ("antkv window flush / encode", ("window_flush", "_vq_", "encode", "_anchor", "_score", "topk", "radix", "sort")),
    ("matmul (weights)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90", "wgmma")),
    ("inductor fused", ("triton_",)),
)


def _cache_kw() -> str:
    """``cache`` or ``past_key_values``: the KV-cache keyword of this transformers' Llama (quiet on both)."""
    from ..hf_compat import default_cache_keyword

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
    from ..reporting import markdown_table

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
    from ..planner import parse_bytes

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


def _split(text) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(x) for x in text]
    return [x.strip() for x in str(text).split(",") if x.strip()]


def _config_has(field: str) -> bool:
    from ..config import AnTKVConfig

    return field in {f.name for f in dataclasses.fields(AnTKVConfig)}


def _store_class(session, device):
    """The layer-store class the session will create on ``device``."""
    if hasattr(session, "store_kind"):
        if session.store_kind(torch.device(device)) == "kernels":
            from ..runtime.kernel_store import KernelLayerStore

            return KernelLayerStore
    from ..numerics.store import AnTKVLayerStore

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
