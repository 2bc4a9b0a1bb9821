"""The runs: throughput sweep, capacity, long prefill, memory accounting."""
from __future__ import annotations

import time
import traceback

import torch

from .common import (
    _cache_kw, _greedy_step, _is_oom, _point_line, _release_stores, _round_up, _split, batch_list, CONFIGS,
    ConfigSpec, parse_size, TARGET_CAPACITY,
)
from .model import new_cache


class RunsMixin:
    """The --runs: throughput, capacity, prefill128k, memory."""

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
        from ..backend import parse_options
        from ..runtime.state import session_for

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
