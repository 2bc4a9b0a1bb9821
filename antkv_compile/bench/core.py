"""The benchmark's state: logging, JSON, sections, device memory, set-up, compiled models."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .common import (
    _config_has, _json_default, _round_up, _set_recompile_limit, _split, _store_class, CONFIGS, codebook_note,
    ConfigSpec, parse_size, Progress, SCHEMA, WEIGHTS_NOTE,
)
from .model import build_model, copy_bandwidth


class BenchCore:
    """Logging, saving, sections, device memory, set-up and the compiled model of each configuration."""

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
            "notes": [WEIGHTS_NOTE, codebook_note(args.antkv_options)],
            "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "throughput": [], "capacity": [], "prefill": [], "memory_points": [],
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
        from ..models import kv_geometry
        from ..planner import ModelShape
        from ..reporting import environment

        a = self.args
        env = environment()
        env["cuda"] = torch.version.cuda
        try:
            env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                        cwd=Path(__file__).resolve().parents[2]).stdout.strip()
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
        from ..backend import parse_options

        return parse_options(self.antkv_options(spec, None))[0]

    def memory_model(self, spec: ConfigSpec, **kw):
        from ..config import get_preset
        from ..planner import MemoryModel

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
            from ..backend import antkv_backend

            inner = self.args.inner if role == "decode" else self.args.prompt_inner
            fn = torch.compile(self.model, backend=antkv_backend, options={**options, "inner": inner}, dynamic=dyn)
        self._wrappers[key] = fn
        return fn

    def set_attention(self, spec: ConfigSpec) -> None:
        if spec.attn != "sdpa":
            from .. import baselines

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

    # -------------------------------------------------------------- availability
    def _available(self, spec: ConfigSpec) -> bool:
        if spec.attn != "sdpa":
            try:
                from .. import baselines  # noqa: F401
            except ImportError as exc:
                self._record_unavailable(spec, f"antkv_compile.baselines is not importable ({exc!r})")
                return False
        return True

    def _record_unavailable(self, spec: ConfigSpec, reason: str) -> None:
        self.log(f"!! {spec.name} unavailable: {reason}")
        self.results.setdefault("unavailable", {})[spec.name] = reason

    def _store_class_for(self, spec: ConfigSpec, cap: int):
        from ..backend import parse_options
        from ..runtime.state import session_for

        session = session_for(*parse_options(self.antkv_options(spec, cap))[:2])
        return _store_class(session, self.device)
