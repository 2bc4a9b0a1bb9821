"""Summary, tables (text and markdown) and plots of a benchmark run."""
from __future__ import annotations

from .common import (
    _check_errors, _emit_table, _gib, CONFIGS, TARGET_CAPACITY, TARGET_SPEEDUP, WEIGHTS_NOTE,
)


class ReportMixin:
    """summarize, report (tables), plots."""

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
        lines = ["notes: " + "; ".join(self.results["notes"])]
        fills = sorted({f"{r['purpose']}: {r['fill']}" for r in self._all_points() if r.get("kind") == "antkv" and r.get("fill")})
        lines += [f"antkv context filled by {f}" for f in fills]
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
