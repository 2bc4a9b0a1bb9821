"""One measured point: a configuration at a batch and context (dense baseline or antkv store), timed."""
from __future__ import annotations

import gc
import math
import time
import traceback
from typing import Any, Callable

import torch

from .check import DecodeChecker
from .common import (
    _cache_kw, _greedy_step, _is_oom, _point_line, _profile_steps, _release_stores, _round_up, _split, _store_class,
    CONFIGS, ConfigSpec,
)
from .model import cache_position, dense_bytes, new_cache, set_position


class PointsMixin:
    """One point: run_point and its dense / antkv set-up, fill, timing, check, memory and planner."""

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
        from ..backend import parse_options
        from ..runtime.state import session_for

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
            m.update({"codes": 0, "anchors": 0, "window_kv": 0, "window_queries": 0, "codebooks": 0, "scratch": 0})
        m["window"] = m["window_kv"] + m["window_queries"]
        m["dense_kv"] = dense_bytes(cache)
        m["cache_total"] = m["codes"] + m["anchors"] + m["window"] + m["codebooks"] + m["scratch"] + m["dense_kv"]
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
