"""Decode step time of the retrieval mode (``offload="host"``, issue 19) against the caches a user has today.

    python benchmarks/offload_bench.py --out DIR                      # H200: 128K and 512K at batch 1, 32K at batch 16
    python benchmarks/offload_bench.py --points 128k,512k --out DIR   # a part (each point is independent)
    python benchmarks/offload_bench.py --dry --out DIR                # CPU: tiny shapes, every code path, seconds

Model: Llama-3-8B's shape with **random bf16 weights** (``antkv_compile.bench``: speed does not depend on the weight
values; no codebook artifact, codebooks learned from the first prefill). Per point (batch, context), in one process:

* ``dense_decode`` (i): the strong FP16/BF16 baseline, the whole static cache in GPU memory, flash-decoding attention
  compiled by Inductor (the e2e benchmark's configuration (b)); skipped where the cache does not fit;
* ``hf_offloaded`` (ii): transformers' own offloaded cache (``StaticCache(..., offloading=True)``: each layer's K/V
  prefetched to the GPU on a side stream before the layer and moved back after it), the model uncompiled, SDPA;
* ``antkv-1`` (iii): ``backend="antkv"`` at 1 bit, everything on the GPU;
* ``antkv-1-offload`` (iv): the same with ``offload="host"`` (``--retrieve-fraction``, ``--retrieve-min``).

Dense caches are filled with random K/V (no prefill); antkv stores by ``store.fill`` (the real encode path; the
retrieval store also writes its host copy there). Reported per point: step time (CUDA events around ``--steps``
greedy steps after ``--warmup``), GPU KV bytes, bytes moved host<->device per step (measured by the retrieval
store's host copy; computed for the offloaded cache: every layer's whole static buffers, both ways), and the
measured host-to-device / device-to-host bandwidth of pinned copies. JSON (environment: device, versions, date,
command) to ``--out``. The point and configuration machinery is the end-to-end benchmark's
(:mod:`antkv_compile.bench`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from antkv_compile.bench import Bench, CONFIGS, ConfigSpec, add_arguments, print_table  # noqa: E402
from antkv_compile.bench.common import _greedy_step, _round_up  # noqa: E402
from antkv_compile.bench.model import new_cache, set_position  # noqa: E402

OFFLOAD = ConfigSpec("antkv-1-offload", "(iv) antkv 1 bit + host retrieval", "antkv", bits="1")
HF_OFFLOADED = ConfigSpec("hf_offloaded", "(ii) transformers offloaded StaticCache (eager, SDPA)", "dense", "sdpa")
SPECS = {"dense_decode": CONFIGS["dense_decode"], "hf_offloaded": HF_OFFLOADED, "antkv-1": CONFIGS["antkv-1"],
         "antkv-1-offload": OFFLOAD}
POINTS = {"128k": (1, 131072), "512k": (1, 524288), "32k": (None, 32768)}  # None: --batch-32k
DRY_POINTS = {"128k": (1, 192), "512k": (1, 384), "32k": (None, 160)}


class OffloadBench(Bench):
    """The e2e benchmark's points, plus the offloaded-cache baseline and the host-traffic measurements."""

    def antkv_options(self, spec, capacity):
        opts = super().antkv_options(spec, capacity)
        if spec.name == OFFLOAD.name:
            opts.update(offload="host", retrieve_fraction=self.args.retrieve_fraction,
                        retrieve_min=self.args.retrieve_min)
        return opts

    def memory_model(self, spec, **kw):
        mm = super().memory_model(spec, **kw)
        if spec.kind == "antkv" and self.antkv_config(spec).offload == "host":
            import dataclasses

            c = self.antkv_config(spec)
            mm = dataclasses.replace(mm, offload=True, retrieve_fraction=c.retrieve_fraction,
                                     retrieve_min=c.retrieve_min)
        return mm

    # -------------------------------------------------------------- host traffic of the retrieval stores
    @staticmethod
    def _host_stores():
        from antkv_compile.runtime.state import _SESSIONS

        return [s for sess in _SESSIONS.values() for s in [*sess.stores.values(), *sess.orphans.values()]
                if getattr(s, "host", None) is not None]

    def _timed(self, step, steps, rec):
        stores = self._host_stores() if rec.get("config") == OFFLOAD.name else []
        before = [(s.host.bytes_read, s.host.bytes_written) for s in stores]
        super()._timed(step, steps, rec)
        if stores:
            n = self.args.warmup + steps  # every step the timing ran (the first, compiling one included)
            rec["host_bytes_read_per_step"] = sum(s.host.bytes_read - b[0] for s, b in zip(stores, before)) / n
            rec["host_bytes_written_per_step"] = sum(s.host.bytes_written - b[1] for s, b in zip(stores, before)) / n
            rec["host_copy_bytes"] = sum(s.host.nbytes() for s in stores)
            rec["host_pinned"] = all(s.host.k.is_pinned() for s in stores) if self.cuda else False
            rec["gather_mode"] = sorted({getattr(s.host, "gather_mode", "plain") for s in stores})
            rec["retrieved_per_layer_head"] = max(s.retrieve_k() for s in stores)

    # -------------------------------------------------------------- (ii) transformers' offloaded cache
    def hf_offloaded_point(self, batch: int, context: int) -> dict:
        a = self.args
        steps = a.steps
        cap = _round_up(context + a.warmup + steps + 2, 64)
        rec = {"purpose": "offload", "config": HF_OFFLOADED.name, "label": HF_OFFLOADED.label, "kind": "dense",
               "batch": batch, "context": context, "capacity": cap, "steps": steps, "warmup": a.warmup,
               "status": "running"}
        self.log(f"-- {HF_OFFLOADED.name}: batch {batch}, context {context:,} (capacity {cap:,})")
        t0 = time.time()
        try:
            from transformers import StaticCache

            self.set_attention(CONFIGS["inductor"])  # sdpa
            # (a CPU has no streams to offload with: --dry runs the same cache without offloading)
            cache = StaticCache(config=self.model.config, max_cache_len=cap, offloading=self.cuda)
            if not self.cuda:
                rec["note"] = "CPU (--dry): offloading needs CUDA, the cache stays where it is"
            g = self.geom
            cache.early_initialization(batch_size=batch, num_heads=g.num_kv_heads, head_dim=g.head_dim,
                                       dtype=self.dtype, device=self.device)
            with torch.no_grad():
                for i, layer in enumerate(cache.layers):
                    layer.keys.normal_()
                    layer.values.normal_()
                    if i and self.cuda:  # as after a forward: layer 0 prefetched, the others in host memory
                        layer.offload()
            set_position(cache, context)
            self.sync()
            rec["fill"] = "random bf16 K/V in the static buffers, layers 1.. offloaded to host memory, position set"
            rec["host_kv_bytes"] = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers[1:])
            step = _greedy_step(self.model, cache, torch.randint(3, self.model.config.vocab_size, (batch, 1),
                                                                 device=self.device))
            self._timed(step, steps, rec)
            per_dir = batch * cap * self.kv_bytes_per_token  # every layer's whole static buffers, each way
            rec["h2d_bytes_per_step"] = per_dir
            rec["d2h_bytes_per_step"] = per_dir
            rec["gpu_kv_bytes"] = 2 * per_dir // g.num_layers  # about two layers resident at a time
            rec["status"] = "ok"
            del cache, step
        except Exception as exc:  # noqa: BLE001 - record, go on with the other points
            rec["status"] = "oom" if "out of memory" in str(exc).lower() else "error"
            rec["reason"] = f"{type(exc).__name__}: {exc}"[:600]
            self.log(f"   {rec['status']}: {rec['reason'][:300]}")
        finally:
            self._free()
            _host_empty_cache()
        rec["seconds"] = round(time.time() - t0, 1)
        if rec["status"] == "ok":
            self.log(f"   {rec['step_ms']:.2f} ms/step; moves {rec['h2d_bytes_per_step'] / 2**30:.2f} GiB each way")
        return rec

    # -------------------------------------------------------------- bandwidth
    def host_bandwidth(self) -> dict:
        """Pinned host <-> device copy bandwidth (GB/s), median of a few 1 GiB (CPU: 16 MiB) copies."""
        n = (1 << 30) if self.cuda else (1 << 24)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        dev = torch.empty(n, dtype=torch.uint8, device=self.device)
        out = {}
        for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
            times = []
            for i in range(6):
                t0 = time.perf_counter()
                if self.cuda:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    dst.copy_(src, non_blocking=True)
                    e1.record()
                    e1.synchronize()
                    dt = e0.elapsed_time(e1) / 1e3
                else:
                    dst.copy_(src)
                    dt = time.perf_counter() - t0
                if i:
                    times.append(dt)
            out[f"{name}_GBps"] = n / statistics.median(times) / 1e9
        del host, dev
        return out

    # -------------------------------------------------------------- the run
    def run_offload(self) -> int:
        a = self.args
        self.setup()
        self.results["benchmark"] = "antkv_compile offload (issue 19)"
        self.results["notes"].append("Llama-3-8B shape with random weights" if a.shape == "llama3-8b"
                                     else "tiny random Llama (--dry: code paths, not speed)")
        bw = self.host_bandwidth()
        self.results["device"].update(bw)
        self.log(f"pinned host->device {bw['h2d_GBps']:.1f} GB/s, device->host {bw['d2h_GBps']:.1f} GB/s")
        table = POINTS if not a.dry else DRY_POINTS
        rows = []
        self.results["offload"] = []
        points = [p.strip() for p in a.points.split(",") if p.strip()]
        extra = a.warmup + max(a.steps, 32) + 2  # (antkv points time whole flush periods of 32 steps)
        # the batch-1 points share one antkv capacity: one compiled model (and session) per configuration serves them
        cap1 = _round_up(max([table[p][1] for p in points if table[p][0] == 1] or [0]) + extra, 64)
        for pname in points:
            batch, ctx = table[pname]
            cap = cap1 if batch == 1 else None
            batch = batch or a.batch_32k
            for cname in [c.strip() for c in a.offload_configs.split(",") if c.strip()]:
                spec = SPECS[cname]
                if spec is HF_OFFLOADED:
                    rec = self.hf_offloaded_point(batch, ctx)
                else:
                    fits = spec.kind != "dense" or self.memory_model(spec).bytes_at(batch, ctx + 64)["total"] <= self.budget
                    if not fits:
                        rec = {"config": cname, "batch": batch, "context": ctx, "status": "skipped",
                               "reason": "the dense cache does not fit the GPU (planner)"}
                        self.log(f"-- {cname}: batch {batch}, context {ctx:,}: skipped (does not fit)")
                    else:
                        self._enter_group((cname, pname) if spec.kind == "dense" else (cname, batch, cap))
                        rec = self.run_point(spec, batch, ctx, purpose="offload", check=False,
                                             capacity=cap if spec.kind == "antkv" else None)
                    _host_empty_cache()
                rec["point"] = pname
                self.results["offload"].append(rec)
                rows.append(_row(rec, self.kv_bytes_per_token, bw))
                self.save()
        _ratios(rows)
        cols = [("point", "point", "s"), ("config", "method", "s"), ("status", "status", "s"),
                ("step_ms", "step ms", ".2f"), ("x_dense", "x dense", ".2f"), ("hf_over", "offloaded / this", ".1f"),
                ("gpu_kv_mib", "GPU KV MiB", ",.1f"), ("gpu_kv_frac", "of FP16 KV", ".3f"),
                ("moved_mib", "host<->GPU MiB/step", ",.2f"), ("moved_ms", "at measured BW ms", ".2f")]
        title = (f"decode step, {'Llama-3-8B shape, random weights' if a.shape == 'llama3-8b' else 'tiny (dry)'}; "
                 f"retrieve {a.retrieve_fraction:.1%} (min {a.retrieve_min}); H2D {bw['h2d_GBps']:.1f} GB/s")
        print_table(rows, cols, title)
        self.results["table"] = rows
        self.results["complete"] = True
        self.save()
        self.log(f"wrote {self.json_path}")
        return 0


def _host_empty_cache() -> None:
    """Give the pinned host memory of finished points back (the caching host allocator keeps it otherwise)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None and torch.cuda.is_available():
        fn()


def _row(rec: dict, kv_bytes_per_token: int, bw: dict) -> dict:
    m = rec.get("memory") or {}
    if rec.get("config") == HF_OFFLOADED.name:
        gpu_kv = rec.get("gpu_kv_bytes")
        moved = (rec.get("h2d_bytes_per_step") or 0) + (rec.get("d2h_bytes_per_step") or 0)
    elif rec.get("kind") == "dense":
        gpu_kv, moved = m.get("dense_kv"), 0
    else:
        gpu_kv = (sum(m.get(k, 0) for k in ("codes", "anchors", "window", "dense_kv")) or None) if m else None
        moved = (rec.get("host_bytes_read_per_step") or 0) + (rec.get("host_bytes_written_per_step") or 0)
    fp16 = rec["batch"] * rec["context"] * kv_bytes_per_token
    return {"point": rec.get("point"), "config": rec["config"], "status": rec["status"], "batch": rec["batch"],
            "context": rec["context"], "step_ms": rec.get("step_ms"),
            "gpu_kv_mib": None if gpu_kv is None else gpu_kv / 2**20,
            "gpu_kv_frac": None if gpu_kv is None else gpu_kv / fp16,
            "moved_mib": moved / 2**20, "moved_ms": moved / (bw["h2d_GBps"] * 1e9) * 1e3}


def _ratios(rows: list[dict]) -> None:
    """Per point: step time over the dense baseline's, and the offloaded cache's step time over each one's."""
    for point in {r["point"] for r in rows}:
        mine = [r for r in rows if r["point"] == point]
        dense = next((r["step_ms"] for r in mine if r["config"] == "dense_decode" and r.get("step_ms")), None)
        hf = next((r["step_ms"] for r in mine if r["config"] == HF_OFFLOADED.name and r.get("step_ms")), None)
        for r in mine:
            if r.get("step_ms"):
                r["x_dense"] = r["step_ms"] / dense if dense else None
                r["hf_over"] = hf / r["step_ms"] if hf else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)  # the e2e benchmark's arguments (shape, device, steps, warm-up, fill, inner compilers, ...)
    p.add_argument("--points", default="128k,512k,32k", help="comma list of 128k (batch 1), 512k (batch 1), 32k")
    p.add_argument("--batch-32k", type=int, default=16, help="batch of the 32k point")
    p.add_argument("--offload-configs", default="dense_decode,hf_offloaded,antkv-1,antkv-1-offload",
                   help=f"comma list of {','.join(SPECS)}")
    p.add_argument("--retrieve-fraction", type=float, default=0.02)
    p.add_argument("--retrieve-min", type=int, default=64)
    p.add_argument("--dry", action="store_true", help="CPU smoke: tiny model, tiny contexts, eager compilers")
    p.set_defaults(steps=4, warmup=2, name=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry:
        args.shape, args.device, args.budget = "tiny", "cpu", "1GiB"
        args.inner = args.prompt_inner = args.baseline_backend = "eager"
        args.steps, args.warmup, args.batch_32k = 2, 1, 2
        args.antkv_options = json.dumps({"store": "kernels", **json.loads(args.antkv_options or "{}")})
        args.progress_every = 0
    args.name = args.name or f"offload_bench_{args.shape}_{time.strftime('%Y%m%d-%H%M%S')}"
    args.configs = "antkv-1"  # (the e2e machinery's configuration list; the points here are chosen by --offload-configs)
    return OffloadBench(args).run_offload()


if __name__ == "__main__":
    sys.exit(main())
