"""The long-context fidelity harness behind ``antkv-compile fidelity`` (issue 16).

Retrieval (passkey, niah, multikey; :mod:`.tasks`) runs every item through one ``generate`` call per batch:

* ``compiled`` (every AnTKV method): ``model.compile(backend="antkv", options=...)`` once per method, then
  ``model.generate(ids, cache_implementation="static", ...)``; prompt included (prefill and decode both run
  through the rewritten graphs). ``disable_compile=True`` keeps transformers from wrapping the decode steps in
  its own ``torch.compile`` (it does so on CUDA for static caches); the model's antkv compile runs them. After
  each call the harness checks that no graph fell back to plain Inductor, that no layer re-homed the prompt from
  the dense cache (= the prompt ran through a graph that was not rewritten) and that the dense StaticCache buffers
  were released: an item that ran uncompressed is an error (:class:`FidelityError`), never a silent FP score.
* ``full`` (full precision): the same ``generate`` call on the uncompiled model.
* ``harness`` (KIVI-style, which has no compiled path; or any method with ``--path harness``): the method core's
  layer stores through :func:`antkv_compile.hf_routing.routed`, with the same protocol: the prompt is one
  prefill chunk (attends exactly to itself, then all but the newest ``window - flush`` tokens are coded), then
  one token per step.

One pass per item gives both scores. The answer tokens are *forced* (a logits processor) and the raw logits of
every step are kept (``output_logits``): the needle-answer NLL is the teacher-forced NLL of the answer tokens,
and greedy exact match is "the argmax equals the answer token at every forced step, and the step after the
answer does not continue the number". That equals greedy decoding + exact match: while the argmax agrees with
the answer, greedy decoding feeds the same tokens the forcing does.

KL divergence (``kl``) runs the perplexity harness's decode-path protocol (:mod:`antkv_compile.evaluation`):
windows of the evaluation text in chunks of ``flush`` tokens, every method and full precision in lockstep on the
same chunk, per predicted token KL(full || method), top-1 agreement and NLL.

Gates (issue 16), per task and pooled, on the cells where full precision scores >= 90 %:
2 bit equals full precision within one sample in every such cell; 1 bit >= 95 % of full precision's accuracy
averaged over them. Cells below 90 % are reported, not gated.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import TASKS, Item, depths, first_number, make_items, token_texts

log = logging.getLogger("antkv_compile.fidelity")

ISSUE_METHODS = ["full", "antkv-4", "antkv-2", "antkv-1", "antkv-0.375", "anchors-none-1", "plain-vq-1", "kivi-2"]
QUICK_METHODS = ["full", "antkv-1", "kivi-2"]
METHOD_GROUPS = {"issue": ISSUE_METHODS, "all": ISSUE_METHODS, "quick": QUICK_METHODS}
PASS_THRESHOLD = 0.9  # full precision's accuracy for a cell to be gated
ONE_BIT_SHARE = 0.95


class FidelityError(RuntimeError):
    """The harness could not measure what it claims (e.g. a compiled item ran with an uncompressed cache)."""


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False)


# ----------------------------------------------------------------------------------------------------- methods ---

@dataclasses.dataclass(frozen=True)
class FidelityMethod:
    name: str
    path: str  # "full" | "compiled" | "harness"
    spec: object  # antkv_compile.evaluation.MethodSpec

    def compile_options(self, artifact, extra: dict | None = None) -> dict:
        cfg = self.spec.config
        opts = {"artifact": artifact, "bits": cfg.preset.name, "anchor_ratio": cfg.anchor_ratio,
                "window": cfg.window, "score": cfg.score}
        if cfg.flush is not None:
            opts["flush"] = cfg.flush
        opts.update(extra or {})
        return opts


def resolve_methods(names: list[str], path: str = "compiled") -> list[FidelityMethod]:
    """Methods by name (``antkv_compile.eval_suite.METHODS``) with the path each one runs: ``full`` uncompiled,
    KIVI through the harness (no compiled path), AnTKV compiled (or the harness with ``path="harness"``)."""
    from .. import eval_suite

    out = []
    for part in names:
        for name in METHOD_GROUPS.get(part, [part]):
            if any(m.name == name for m in out):
                continue
            spec = eval_suite.resolve([name])[0]
            p = {"full": "full", "kivi": "harness"}.get(spec.family, path)
            out.append(FidelityMethod(name, p, spec))
    if out and out[0].name != "full" and any(m.name == "full" for m in out):
        out.sort(key=lambda m: m.name != "full")  # full precision first: its cells decide what is gated
    return out


# --------------------------------------------------------------------------------------------- artifacts / model ---

def load_model_and_tokenizer(name: str, dtype: torch.dtype, device: str):
    """``smollm2`` / a GGUF / an HF folder (:func:`antkv_compile.models.load_model`), or ``tiny-<arch>`` (random
    weights with the character tokenizer: plumbing only, its accuracy means nothing)."""
    from ..models import load_model, tiny_model, tiny_tokenizer

    if name.startswith("tiny-"):
        return tiny_model(name[len("tiny-"):], dtype=dtype).to(device), tiny_tokenizer(bos=True)
    return load_model(name, dtype=dtype, device=device)


def ensure_artifacts(model, tok, methods: list[FidelityMethod], args) -> dict:
    """The codebooks each AnTKV method needs: loaded from ``args.artifacts/<recipe>`` (the folders ``antkv-compile
    eval`` writes) or calibrated there on the calibration text, as ``eval`` does."""
    from ..cli import recipe_artifacts

    return recipe_artifacts(model, tok, args, sorted({m.spec.artifact for m in methods if m.spec.artifact}))


# ------------------------------------------------------------------------------------------------- retrieval ---

@dataclasses.dataclass
class ItemResult:
    task: str
    length: int
    depth_index: int
    sample: int
    correct: bool
    nll: float  # teacher-forced NLL of the answer tokens (sum)
    answer_tokens: int
    predicted: str  # the argmax tokens under forcing, decoded (equals greedy output up to the first miss)
    predicted_number: str | None
    distractor_hit: bool  # multikey: the model named a distractor's value


class _ForceAnswer:
    """Logits processor: at step j < A replaces the scores by a one-hot on the answer token (teacher forcing)."""

    def __init__(self, gold: Tensor, prompt_len: int):
        self.gold, self.prompt_len = gold, prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        j = input_ids.shape[1] - self.prompt_len
        if j >= self.gold.shape[1]:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, self.gold[:, j:j + 1].to(scores.device), 0.0)
        return forced


def _score_steps(tok, items: list[Item], gold: Tensor, step_logits: Tensor) -> list[ItemResult]:
    """step_logits [B, A+1, V] (raw, step j predicts answer token j; step A the token after the answer)."""
    logp = torch.log_softmax(step_logits.float(), dim=-1)
    pred = step_logits.argmax(-1).cpu()
    out = []
    for b, it in enumerate(items):
        a = len(it.answer_ids)
        g = gold[b, :a].cpu()
        nll = -float(logp[b, torch.arange(a), g.to(logp.device)].sum())
        texts = token_texts(tok, pred[b, :a + 1].tolist())
        after = texts[a] if a < len(texts) else ""
        correct = bool((pred[b, :a] == g).all()) and not after[:1].isdigit()
        predicted = "".join(texts)
        number = first_number(predicted)
        out.append(ItemResult(it.task, it.length, it.depth_index, it.sample, correct, nll, a, predicted, number,
                              bool(it.distractors) and number in it.distractors))
    return out


def _released(cache) -> bool:
    """True when every layer's dense K/V buffer was given back (the antkv store held the tokens)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    for layer in layers:
        k = getattr(layer, "keys", None)
        if k is None or k.numel() <= 1:
            continue
        if k.untyped_storage().nbytes() > k.element_size():
            return False
    return True


class _RehomeCounter:
    """Counts prefix re-homings while active: a compiled step that found no store for a cache at a position > 0
    and adopted the tokens of the dense cache, i.e. the prompt ran through a graph that was *not* rewritten."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from ..runtime.state import Session

        self._real = Session._rehome_prefix
        counter = self

        def spy(session, *a, **kw):
            counter.count += 1
            return counter._real(session, *a, **kw)

        Session._rehome_prefix = spy
        return self

    def __exit__(self, *exc):
        from ..runtime.state import Session

        Session._rehome_prefix = self._real
        return False


def _generate_forced(model, ids: Tensor, gold: Tensor, max_cache_len: int) -> tuple[Tensor, object]:
    from transformers import LogitsProcessorList

    from transformers import GenerationConfig

    a = gold.shape[1]
    # one static cache size for every prompt (so the decode graph keeps its shape); transformers < 5.2x has no
    # max_cache_len and sizes each cache to its call (longest prompts run first)
    sized = {"max_cache_len": max_cache_len} if hasattr(GenerationConfig(), "max_cache_len") else {}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=a + 1, min_new_tokens=a + 1, do_sample=False,
        num_beams=1, cache_implementation="static", disable_compile=True, **sized,
        logits_processor=LogitsProcessorList([_ForceAnswer(gold, ids.shape[1])]), output_logits=True,
        return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id
        if model.generation_config.pad_token_id is not None else 0,
        eos_token_id=None, repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
    return torch.stack(out.logits, dim=1), out.past_key_values


class _HarnessStores:
    """The method core's stores for one batch, with a memory-light exact prefill for stores that keep no queries
    (KIVI-style, full precision): on an empty store a long chunk attends exactly to itself, which is what
    ``store.attend`` computes, without its dense [T, T] score matrix."""

    def __init__(self, model, spec, artifacts, batch: int, capacity: int):
        from ..evaluation import _scaling, _stores
        from ..models import kv_geometry
        from ..numerics.store import StoreGeometry

        geom_kv = kv_geometry(model.config)
        param = next(model.parameters())
        geometry = StoreGeometry(batch, geom_kv.num_kv_heads, geom_kv.head_dim, capacity, param.dtype, param.device,
                                 scale=_scaling(model))
        self.stores = _stores(spec, geom_kv, geometry, artifacts, model)

    def __call__(self, layer, q, k, v, scale):
        from ..numerics.store import ExactLayerStore, ScalarLayerStore

        store = self.stores[layer]
        if len(store) == 0 and q.shape[2] > 1 and isinstance(store, (ScalarLayerStore, ExactLayerStore)):
            return sdpa_prefill(store, q, k, v, scale)
        return store.attend(q, k, v, check_finite=False)


def sdpa_prefill(store, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``store.attend(q, k, v)`` on an empty KIVI-style / exact store, through SDPA (no [T, T] matrix)."""
    from ..numerics.store import ExactLayerStore

    store._validate(q, k, v, False)
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True, scale=scale)
    store.win_k, store.win_v = k, v
    if not isinstance(store, ExactLayerStore) and store.n_window >= store.window:
        n = store.n_window - (store.window - store.flush)
        store._flush(n)
        store.win_k, store.win_v = store.win_k[:, :, n:], store.win_v[:, :, n:]
    return out.to(q.dtype)


@torch.no_grad()
def _harness_forced(model, spec, artifacts, ids: Tensor, gold: Tensor, capacity: int) -> Tensor:
    from ..hf_routing import chunk_logits, routed

    b, length = ids.shape
    handler = _HarnessStores(model, spec, artifacts, b, capacity)
    steps = []
    with routed(model, handler):
        pos = torch.arange(length, device=ids.device)[None].expand(b, length)
        steps.append(model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1])
        for j in range(gold.shape[1]):
            steps.append(chunk_logits(model, gold[:, j:j + 1], length + j)[:, -1])
    return torch.stack(steps, dim=1)


def _batches(items: list[Item], batch: int):
    """Items grouped by length (longest first) in batches of ``batch`` (one size for every length, so the compiled
    decode graph keeps one shape); the last batch of a length is topped up with copies of its first item (``real``
    counts the items to keep)."""
    by_len: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_len[it.length].append(it)
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            yield length, chunk + [chunk[0]] * (batch - len(chunk)), len(chunk)


def _count_graphs(facts: dict, records: list) -> None:
    facts["compiled_graphs"] += len(records)
    facts["rewritten_graphs"] += sum(1 for r in records if r.get("after") is not None)
    facts["fallback_graphs"] += sum(1 for r in records if r.get("after") is None)


def run_retrieval(model, tok, method: FidelityMethod, items: list[Item], artifacts: dict, *, batch: int = 20,
                  compile_extra: dict | None = None, recompile_per_length: bool = False,
                  quiet: bool = False, deadline: float | None = None) -> tuple[list[ItemResult], dict]:
    """Every item through ``method``'s path; returns per-item results and run facts (path, seconds, graphs).
    Past ``deadline`` (``time.time()``) no new batch starts: the results so far come back with ``facts["stopped"]``."""
    from ..backend import last_compiles

    device = next(model.parameters()).device
    max_answer = max(len(it.answer_ids) for it in items)
    max_cache_len = max(it.length for it in items) + max_answer + 2
    facts = {"path": method.path, "compiled_graphs": 0, "rewritten_graphs": 0, "fallback_graphs": 0}
    t0 = time.time()

    def compile_model():
        torch._dynamo.reset()
        model._compiled_call_impl = None
        art = artifacts.get(method.spec.artifact) if method.spec.artifact else None
        model.compile(backend="antkv", options=method.compile_options(art, compile_extra))

    results: list[ItemResult] = []
    last_compiles.clear()
    if method.path == "compiled":
        compile_model()
    bar = _progress(len(items), method.name, quiet)
    current_len = None
    try:
        for length, rows, real in _batches(items, min(batch, len(items))):
            if deadline is not None and time.time() > deadline:
                facts["stopped"] = True
                break
            if method.path == "compiled" and recompile_per_length and current_len not in (None, length):
                _count_graphs(facts, last_compiles)
                compile_model()
                last_compiles.clear()
            current_len = length
            ids = torch.tensor([list(it.input_ids) for it in rows], device=device)
            a = max(len(it.answer_ids) for it in rows)
            gold = torch.tensor([list(it.answer_ids) + [0] * (a - len(it.answer_ids)) for it in rows], device=device)
            if method.path == "harness":
                logits = _harness_forced(model, method.spec, artifacts, ids, gold, max_cache_len)
            else:
                with torch.no_grad(), _RehomeCounter() as rehomed:
                    logits, cache = _generate_forced(model, ids, gold, max_cache_len)
                fallback = [r for r in last_compiles if r.get("after") is None]
                if method.path == "compiled" and (rehomed.count or fallback or not _released(cache)):
                    raise FidelityError(
                        f"{method.name}: the compiled model did not run the {length}-token prompt through a rewritten "
                        f"graph ({len(fallback)} fallback graph(s), {rehomed.count} layer(s) re-homed from the dense "
                        f"cache, dense cache released: {_released(cache)}): one compiled model does not compress "
                        "this prompt length. Re-run with --recompile-per-length (a fresh model.compile per length)")
                del cache
            results += _score_steps(tok, rows[:real], gold[:real], logits[:real])
            bar.update(real)
    finally:
        bar.close()
        if method.path == "compiled":
            _count_graphs(facts, last_compiles)
            model._compiled_call_impl = None
            torch._dynamo.reset()
    facts["seconds"] = round(time.time() - t0, 1)
    return results, facts


# -------------------------------------------------------------------------------------------------------- KL ---

@torch.no_grad()
def run_kl(model, tok, methods: list[FidelityMethod], artifacts: dict, *, windows: int, window_len: int,
           text: str = "evaluation", batch_size: int = 2, quiet: bool = False) -> dict:
    """Per predicted token KL(full || method), top-1 agreement and NLL over ``windows`` x ``window_len`` tokens of
    ``text``, every method in lockstep with full precision through the decode-path protocol (chunks of flush)."""
    from ..evaluation import MethodSpec, _scaling, _stores
    from ..hf_routing import chunk_logits, routed
    from ..models import kv_geometry
    from ..numerics.store import StoreGeometry
    from ..texts import load_text, token_contexts

    specs = [dataclasses.replace(m.spec, config=dataclasses.replace(m.spec.config, coded_path="dequantized"))
             if m.spec.family == "antkv" else m.spec for m in methods if m.spec.family != "full"]
    if not specs:
        return {}
    chunk = specs[0].config.flush_size
    if any(s.config.flush_size != chunk for s in specs):
        raise ValueError("KL runs every method in lockstep: give them one window / flush")
    contexts = token_contexts(tok, load_text(text), window_len, num_contexts=windows)
    geom_kv = kv_geometry(model.config)
    param = next(model.parameters())
    per = {s.name: {"kl": [], "top1_same": [], "nll": []} for s in specs}
    fp_nll = []
    bounds = list(range(0, window_len, chunk))
    bar = _progress(math.ceil(windows / batch_size) * len(bounds), "KL", quiet)
    t0 = time.time()
    for b0 in range(0, windows, batch_size):
        ids = contexts[b0:b0 + batch_size].to(param.device)
        b = ids.shape[0]
        geometry = StoreGeometry(b, geom_kv.num_kv_heads, geom_kv.head_dim, window_len, param.dtype, param.device,
                                 scale=_scaling(model))
        full_stores = _stores(MethodSpec("full", "full"), geom_kv, geometry, artifacts, model)
        method_stores = {s.name: _stores(s, geom_kv, geometry, artifacts, model) for s in specs}
        for s in bounds:
            e = min(s + chunk, window_len)
            targets = ids[:, s + 1:e + 1]
            n = targets.shape[1]

            def fp_handler(layer, q, k, v, scale):
                return full_stores[layer].attend(q, k, v)

            with routed(model, fp_handler):
                lp_full = torch.log_softmax(chunk_logits(model, ids[:, s:e], s).float(), dim=-1)[:, :n]
            fp_nll.append(-lp_full.gather(-1, targets[..., None])[..., 0].flatten().cpu())
            p_full = lp_full.exp()
            top_full = lp_full.argmax(-1)
            for name, stores in method_stores.items():
                def handler(layer, q, k, v, scale, stores=stores):
                    return stores[layer].attend(q, k, v, check_finite=False)

                with routed(model, handler):
                    lp = torch.log_softmax(chunk_logits(model, ids[:, s:e], s).float(), dim=-1)[:, :n]
                per[name]["kl"].append((p_full * (lp_full - lp)).sum(-1).clamp_min(0).flatten().cpu())
                per[name]["top1_same"].append((lp.argmax(-1) == top_full).flatten().cpu())
                per[name]["nll"].append(-lp.gather(-1, targets[..., None])[..., 0].flatten().cpu())
            bar.update(1)
    bar.close()
    fp = torch.cat(fp_nll).double()
    out = {"full": {"tokens": int(fp.numel()), "perplexity": math.exp(fp.mean().item())}}
    for name, d in per.items():
        kl = torch.cat(d["kl"]).double()
        nll = torch.cat(d["nll"]).double()
        out[name] = {
            "tokens": int(kl.numel()), "kl_mean": kl.mean().item(), "kl_p99": torch.quantile(kl, 0.99).item(),
            "kl_max": kl.max().item(), "top1_changed": 1.0 - torch.cat(d["top1_same"]).float().mean().item(),
            "perplexity": math.exp(nll.mean().item()), "ppl_ratio": math.exp((nll.mean() - fp.mean()).item()),
        }
    out["_seconds"] = round(time.time() - t0, 1)
    return out


# ----------------------------------------------------------------------------------------------------- gates ---

def cell_table(results: list[ItemResult]) -> dict[tuple[str, int, int], dict]:
    """(task, length, depth index) -> correct, n, accuracy, mean answer NLL."""
    cells: dict = defaultdict(lambda: {"correct": 0, "n": 0, "nll": 0.0, "distractor_hits": 0})
    for r in results:
        c = cells[(r.task, r.length, r.depth_index)]
        c["correct"] += int(r.correct)
        c["n"] += 1
        c["nll"] += r.nll
        c["distractor_hits"] += int(r.distractor_hit)
    for c in cells.values():
        c["accuracy"] = c["correct"] / c["n"]
        c["nll"] /= c["n"]
    return dict(cells)


def gates(cells: dict[str, dict], two_bit: str = "antkv-2", one_bit: str = "antkv-1") -> dict:
    """Issue 16's gates from per-method cell tables (method -> cell_table), per task and pooled."""
    full = cells.get("full")
    if full is None:
        return {"note": "no full-precision run: nothing gated"}
    out = {}
    for task in sorted({k[0] for k in full}) + ["all"]:
        keys = [k for k in full if task in ("all", k[0])]
        passing = [k for k in keys if full[k]["accuracy"] >= PASS_THRESHOLD]
        g = {"cells": len(keys), "cells_gated": len(passing),
             "full_accuracy_gated": _mean([full[k]["accuracy"] for k in passing])}
        for name, table in cells.items():
            if name == "full" or not passing or any(k not in table for k in passing):
                continue
            acc = _mean([table[k]["accuracy"] for k in passing])
            worst = max(abs(table[k]["correct"] - full[k]["correct"]) for k in passing)
            g[name] = {"accuracy_gated": acc, "share_of_full": acc / g["full_accuracy_gated"]
                       if g["full_accuracy_gated"] else None, "max_cell_diff_samples": worst}
        if two_bit in g:
            g["gate_2bit_within_one_sample"] = g[two_bit]["max_cell_diff_samples"] <= 1
        if one_bit in g:
            g["gate_1bit_95pct"] = (g[one_bit]["share_of_full"] or 0.0) >= ONE_BIT_SHARE
        out[task] = g
    return out


def gated_items(items: list[Item], cells: dict[str, dict]) -> list[Item]:
    """``--cells gated``: the items of the cells full precision passes (>= 90 %), the only cells the gates read."""
    full = cells.get("full")
    if full is None:
        raise SystemExit("--cells gated needs full precision's cells first: run 'full' in the same run or "
                         "--resume a JSON that has them")
    keep = {k for k, c in full.items() if c["accuracy"] >= PASS_THRESHOLD}
    return [it for it in items if (it.task, it.length, it.depth_index) in keep]


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def by_depth(table: dict, n_depths: int) -> list[float | None]:
    """Accuracy per depth index, pooled over tasks and lengths."""
    out = []
    for di in range(n_depths):
        cs = [c for k, c in table.items() if k[2] == di]
        out.append(sum(c["correct"] for c in cs) / sum(c["n"] for c in cs) if cs else None)
    return out


# ----------------------------------------------------------------------------------------------------- plots ---

def plot_heatmaps(method: str, table: dict, tasks: list[str], lengths: list[int], depth_list: list[float],
                  path: Path, title: str) -> Path:
    """One PNG per method: a length x depth accuracy heatmap per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.55 * len(depth_list) * len(tasks) + 1.2 * len(tasks),
                                                     1.2 + 0.45 * len(lengths)), squeeze=False)
    im = None
    for ax, task in zip(axes[0], tasks):
        grid = [[table.get((task, L, di), {}).get("accuracy", float("nan")) for di in range(len(depth_list))]
                for L in lengths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depth_list)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j] * 100:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(depth_list)), [f"{d:.0%}" for d in depth_list], fontsize=6, rotation=90)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=7)
        if ax is axes[0][0]:
            ax.set_ylabel("prompt tokens", fontsize=7)
        ax.set_title(task, fontsize=8)
    fig.suptitle(f"{method}: {title}", fontsize=8, y=1.06)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- run ---

def _key(k) -> str:
    return f"{k[0]}/{k[1]}/{k[2]}"


def run(args) -> dict:
    """The whole fidelity run of ``args`` (see :func:`add_arguments`); prints progress, gates and the table last,
    writes the JSON and the heatmaps; returns the JSON payload."""
    from ..reporting import print_table, write_json

    torch.manual_seed(args.seed)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    model, tok = load_model_and_tokenizer(args.model, dtype, args.device)
    methods = resolve_methods(args.methods.split(","), path=args.path)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {list(TASKS)}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    depth_list = depths(args.depths)
    items = make_items(tok, tasks, lengths, args.depths, args.samples, seed=args.seed, text=args.haystack,
                       distractors=args.distractors) if tasks and args.samples > 0 else []
    artifacts = ensure_artifacts(model, tok, methods, args)
    extra = {"inner": args.inner} if args.inner != "inductor" else {}
    if args.store:
        extra["store"] = args.store
    print(f"fidelity: {len(items)} items ({','.join(tasks)} x lengths {lengths} x {len(depth_list)} depths x "
          f"{args.samples} samples) x {len(methods)} methods on {args.device}", flush=True)

    cells, facts, items_out, kl, unfinished = (resumed(args.resume, methods, args) if args.resume
                                               else ({}, {}, {}, {}, {}))
    deadline = t_start + args.stop_after if args.stop_after else None

    def checkpoint(partial=True):  # the JSON after every method (and at a stop): a stopped run keeps what it did
        if args.out:
            write_json(args.out, payload(args, methods, tasks, lengths, depth_list, cells, facts, kl, items_out,
                                         [], extra, t_start, partial=partial, unfinished=unfinished))

    stopped = False
    for m in methods:
        if not items:
            break
        if m.name in cells:
            print(f"{m.name:16s} resumed from {args.resume}", flush=True)
            continue
        todo = items if m.name == "full" or args.cells == "all" else gated_items(items, cells)
        done = [ItemResult(**r) for r in unfinished.pop(m.name, [])]
        seen = {(r.task, r.length, r.depth_index, r.sample) for r in done}
        todo = [it for it in todo if (it.task, it.length, it.depth_index, it.sample) not in seen]
        if not todo and not done:
            print(f"{m.name:16s} no cell to run (--cells gated: full precision passes none)", flush=True)
            continue
        res, f = run_retrieval(model, tok, m, todo, artifacts, batch=args.batch, compile_extra=extra,
                               recompile_per_length=args.recompile_per_length, quiet=args.quiet,
                               deadline=deadline) if todo else ([], {"path": m.path, "seconds": 0.0})
        res = done + res
        f["seconds"] = round(f["seconds"] + facts.get(m.name, {}).get("seconds", 0.0), 1)
        if f.pop("stopped", False):
            unfinished[m.name], facts[m.name] = [dataclasses.asdict(r) for r in res], f
            print(f"{m.name:16s} stopped by --stop-after after {len(res)} of {len(done) + len(todo)} items"
                  f": continue with --resume {args.out}", flush=True)
            stopped = True
            break
        cells[m.name], facts[m.name] = cell_table(res), f
        items_out[m.name] = [dataclasses.asdict(r) for r in res]
        acc = sum(r.correct for r in res) / len(res)
        print(f"{m.name:16s} [{m.path:8s}] accuracy {acc:6.1%}  mean answer NLL "
              f"{sum(r.nll for r in res) / len(res):7.3f}  {f['seconds']:7.1f}s", flush=True)
        checkpoint()
    if stopped or (deadline is not None and time.time() > deadline):
        checkpoint()
        print(f"stopped by --stop-after {args.stop_after}s; wrote {args.out}: --resume it to go on", flush=True)
        return payload(args, methods, tasks, lengths, depth_list, cells, facts, kl, items_out, [], extra, t_start,
                       partial=True, unfinished=unfinished)

    missing_kl = [m for m in methods if m.name != "full" and m.name not in kl]
    if args.kl_windows > 0 and missing_kl:
        new = run_kl(model, tok, missing_kl, artifacts, windows=args.kl_windows, window_len=args.kl_len,
                     text=args.haystack, batch_size=args.kl_batch, quiet=args.quiet)
        print(f"KL: {args.kl_windows} x {args.kl_len} tokens in {new.get('_seconds', 0)}s", flush=True)
        new["_seconds"] = round(kl.get("_seconds", 0) + new.get("_seconds", 0), 1)
        kl.update(new)

    plots = []
    if args.plots and cells:
        title = f"accuracy, {args.samples} samples/cell, {_model_label(args)}, {args.device}"
        for name, table in cells.items():
            plots.append(str(plot_heatmaps(name, table, tasks, lengths, depth_list,
                                           Path(args.plots) / f"fidelity_{name}.png", title)))
    out = payload(args, methods, tasks, lengths, depth_list, cells, facts, kl, items_out, plots, extra, t_start)
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    for p in plots:
        print(f"wrote {p}")
    _print_gates(out["gates"], [m.name for m in methods], len(depth_list), cells)
    n_cells = len(tasks) * len(lengths) * len(depth_list)
    over = "" if out["protocol"]["table_cells"] == n_cells else \
        f" (accuracies over the {out['protocol']['table_cells']} of {n_cells} cells every method ran)"
    print_table(out["table"], table_columns(tasks), f"long-context fidelity, {_model_label(args)} on {args.device}: "
                f"{len(lengths)} lengths x {len(depth_list)} depths x {args.samples} samples per task{over}; KL on "
                f"{args.kl_windows} x {args.kl_len} tokens of {args.haystack}")
    return out


def table_columns(tasks: list[str]) -> list[tuple[str, str, str]]:
    """The printed / markdown table's columns (key, header, format)."""
    cols = [("method", "method", "s"), ("path", "path", "s"), ("bits", "bits", "g")]
    cols += [(f"acc_{t}", t, ".1%") for t in tasks]
    cols += [("gated_share", "x full (gated)", ".3f"), ("answer_nll", "answer NLL", ".3f"),
             ("kl_mean", "KL mean", ".4f"), ("kl_p99", "KL p99", ".3f"), ("top1_changed", "top-1 changed", ".2%"),
             ("ppl_ratio", "ppl x full", ".3f")]
    return cols


def resumed(path: str, methods: list[FidelityMethod], args) -> tuple[dict, dict, dict, dict, dict]:
    """Cells, facts, items and KL of the methods an earlier JSON (``--resume``) finished, and the items of the one
    it stopped in (``--stop-after``), after checking that it ran the same protocol; the rest run now."""
    import json

    prev = json.loads(Path(path).read_text())
    proto = prev.get("protocol", {})
    lengths = [int(x) for x in args.lengths.split(",") if x]
    want = {"tasks": [t for t in args.tasks.split(",") if t], "seed": args.seed, "haystack_text": args.haystack,
            "distractors": args.distractors}
    diff = {k: (proto.get(k), v) for k, v in want.items() if proto.get(k) != v}
    if len(proto.get("depths", [])) != args.depths:
        diff["depths"] = (len(proto.get("depths", [])), args.depths)
    same_grid = proto.get("lengths") == lengths and proto.get("samples_per_cell") == args.samples
    # items are fixed by (task, length, depth, sample): a larger grid that saved its items holds this one's results
    sub_grid = (set(lengths) <= set(proto.get("lengths", [])) and args.samples <= proto.get("samples_per_cell", 0)
                and bool(prev.get("items")))
    if not (same_grid or sub_grid):
        diff["grid"] = ((proto.get("lengths"), proto.get("samples_per_cell"), "items saved" if prev.get("items")
                         else "no items"), (lengths, args.samples))
    if diff:
        raise SystemExit(f"--resume {path}: that run used another protocol ({diff}, as (there, here)); resume only "
                         "with the same tasks, depths, seed, haystack and distractors, and the same lengths and samples "
                         "or a subset of a run that saved its items (--save-items)")
    names = {m.name for m in methods}
    cells, facts, items_out = {}, {}, {}
    unfinished = {n: rs for n, rs in (prev.get("unfinished") or {}).items() if n in names}
    if unfinished and not same_grid:
        raise SystemExit(f"--resume {path}: it stopped inside {sorted(unfinished)}; resume it with its own grid")
    for name in unfinished:
        facts[name] = {"seconds": prev["methods"][name].get("seconds", 0.0)}
    for name, rec in prev.get("methods", {}).items():
        if name not in names or not rec.get("cells"):
            continue
        if same_grid:
            cells[name] = {(t, int(L), int(d)): c for k, c in rec["cells"].items() for t, L, d in [k.split("/")]}
            items_out[name] = (prev.get("items") or {}).get(name)
        else:
            kept = [r for r in prev["items"][name] if r["length"] in lengths and r["sample"] < args.samples]
            cells[name], items_out[name] = cell_table([ItemResult(**r) for r in kept]), kept
        facts[name] = {k: rec[k] for k in ("path", "compiled_graphs", "rewritten_graphs", "fallback_graphs", "seconds")
                       if k in rec}
        facts[name]["resumed_from"] = str(path)
    items_out = {k: v for k, v in items_out.items() if v is not None}
    kl = {k: v for k, v in (prev.get("kl") or {}).items() if k in names or k in ("full", "_seconds")}
    return cells, facts, items_out, kl, unfinished


def payload(args, methods, tasks, lengths, depth_list, cells, facts, kl, items_out, plots, extra, t_start,
            partial: bool = False, unfinished: dict | None = None) -> dict:
    """The JSON of a run (``partial``: written after each method, before the KL and the plots)."""
    from ..reporting import environment, markdown_table

    g = gates(cells) if cells else {}
    shared = shared_cells(cells)
    rows = []
    for m in methods:
        row = {"method": m.name, "path": m.path, "bits": m.spec.nominal_bits}
        t = {k: c for k, c in cells.get(m.name, {}).items() if k in shared}
        for task in tasks:
            cs = [c for k, c in t.items() if k[0] == task]
            row[f"acc_{task}"] = sum(c["correct"] for c in cs) / sum(c["n"] for c in cs) if cs else None
        ga = g.get("all", {})
        row["gated_share"] = ga.get(m.name, {}).get("share_of_full") if m.name != "full" else (1.0 if ga.get("cells_gated") else None)
        row["answer_nll"] = _mean([c["nll"] for c in t.values()])
        k = kl.get(m.name, {})
        row.update({"kl_mean": k.get("kl_mean"), "kl_p99": k.get("kl_p99"), "top1_changed": k.get("top1_changed"),
                    "ppl_ratio": k.get("ppl_ratio")})
        rows.append(row)
    return {
        "partial": partial,
        "environment": environment(),
        "model": _model_label(args),
        "protocol": {
            "tasks": tasks, "lengths": lengths, "depths": depth_list, "samples_per_cell": args.samples,
            "seed": args.seed, "haystack_text": args.haystack, "distractors": args.distractors,
            "answer_scoring": "answer tokens forced; exact match = argmax equals every answer token and the next "
                              "token does not continue the number (= greedy decoding + exact match); NLL = "
                              "teacher-forced NLL of the answer tokens (sum)",
            "paths": {m.name: {"full": "uncompiled model.generate(cache_implementation='static')",
                               "compiled": "model.compile(backend='antkv', options) + model.generate("
                                           "cache_implementation='static'), prompt included",
                               "harness": "method-core stores through hf_routing (no compiled path): prompt as one "
                                          "prefill chunk, then one token per step"}[m.path] for m in methods},
            "window": methods[0].spec.config.window if methods else None,
            "anchor_ratio": methods[0].spec.config.anchor_ratio if methods else None,
            "kl": {"windows": args.kl_windows, "window_len": args.kl_len, "text": args.haystack,
                   "protocol": "decode-path harness (antkv_compile.evaluation), chunks of flush tokens, "
                               "KL(full || method) per predicted token"},
            "calibration": {"text": args.calib_text, "tokens": args.calib_tokens, "artifacts": args.artifacts},
            "compile_extra_options": extra, "recompile_per_length": args.recompile_per_length,
            "dtype": args.dtype, "pass_threshold": PASS_THRESHOLD, "cells": args.cells,
            "table_cells": len(shared),
        },
        "methods": {m.name: {"path": m.path, "family": m.spec.family, "nominal_bits": m.spec.nominal_bits,
                             "artifact": m.spec.artifact, "score": m.spec.config.score, **facts.get(m.name, {}),
                             "by_depth": by_depth(cells.get(m.name, {}), len(depth_list)),
                             "cells": {_key(k): v for k, v in sorted(cells.get(m.name, {}).items())}}
                    for m in methods},
        "gates": g,
        "kl": kl,
        "items": items_out if args.save_items else None,
        "unfinished": unfinished or None,  # per-item results of a method stopped by --stop-after (for --resume)
        "table": rows,
        "markdown": markdown_table(rows, table_columns(tasks)),
        "plots": plots,
        "seconds": round(time.time() - t_start, 1),
    }


def shared_cells(cells: dict[str, dict]) -> set:
    """The cells every method with results ran: the table's accuracies and NLLs are over these, so that a method
    run on the gated cells alone (``--cells gated``) is compared on the same cells as full precision."""
    ran = [set(t) for t in cells.values() if t]
    return set.intersection(*ran) if ran else set()


def _model_label(args) -> str:
    from ..cli import _model_id

    return args.model if args.model.startswith("tiny-") else _model_id(args)


def _print_gates(g: dict, names: list[str], n_depths: int, cells: dict) -> None:
    if not g or "note" in g:
        print(g.get("note", "") if g else "")
        return
    for task, d in g.items():
        line = (f"gates [{task}]: {d['cells_gated']}/{d['cells']} cells gated (full precision >= "
                f"{PASS_THRESHOLD:.0%})")
        if "gate_2bit_within_one_sample" in d:
            line += f"; 2 bit within one sample: {'met' if d['gate_2bit_within_one_sample'] else 'MISSED'}"
        if "gate_1bit_95pct" in d:
            line += (f"; 1 bit {d['antkv-1']['share_of_full']:.3f} of full: "
                     f"{'met' if d['gate_1bit_95pct'] else 'MISSED'}")
        print(line)
    for name in names:
        if name in cells:
            print(f"  by depth {name:16s} " + " ".join("  - " if a is None else f"{a:4.0%}"
                                                      for a in by_depth(cells[name], n_depths)))


def add_arguments(p) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a GGUF / HF folder, or tiny-<arch> "
                                                     "(random weights, plumbing only)")
    p.add_argument("--device", default=dev)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0, help="item seed (never tuned: the grid uses seed 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {list(TASKS)}")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths in tokens")
    p.add_argument("--depths", type=int, default=10, help="needle depths, evenly from 0%% to 100%%")
    p.add_argument("--samples", type=int, default=20, help="items per (task, length, depth) cell")
    p.add_argument("--distractors", type=int, default=1,
                   help="multikey: distractor needles whose keys share the noun (default 1: with 3, full precision "
                        "picked a distractor in 3 of 4 dev items at 1K, seed 999; 1: 4 of 4 right)")
    p.add_argument("--haystack", default="evaluation",
                   help="prose for niah/multikey and the KL windows: 'evaluation' (license texts) or a UTF-8 file")
    p.add_argument("--methods", default="issue",
                   help="issue (default: " + ",".join(ISSUE_METHODS) + ") | quick | comma list of eval method names")
    p.add_argument("--path", default="compiled", choices=["compiled", "harness"],
                   help="how AnTKV methods run retrieval: compiled (model.compile + generate, default) or the "
                        "method-core harness (KIVI always runs there; full precision is uncompiled generate)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="compiled path: Inductor (default) or the rewritten graph run eagerly (fast compile)")
    p.add_argument("--store", default=None, choices=["auto", "reference", "kernels"], help="compiled store option")
    p.add_argument("--cells", default="all", choices=["all", "gated"],
                   help="which cells the methods other than full precision run: all (default) or only the gated "
                        "ones (full precision >= 90 %%; the others are reported for full precision alone)")
    p.add_argument("--recompile-per-length", action="store_true",
                   help="fresh model.compile for each prompt length (workaround while one compiled model "
                        "does not compress every prompt length)")
    p.add_argument("--batch", type=int, default=20,
                   help="prompts per generate call, every length (one decode-graph shape; 20 x 8K fits an H200 "
                        "easily; use 1-4 on a CPU)")
    p.add_argument("--kl-windows", type=int, default=2, help="evaluation-text windows for KL (0: no KL)")
    p.add_argument("--kl-len", type=int, default=8192, help="tokens per KL window")
    p.add_argument("--kl-batch", type=int, default=2)
    p.add_argument("--artifacts", default="artifacts/smollm2", help="codebook cache: one folder per recipe "
                                                                   "(shared with antkv-compile eval)")
    p.add_argument("--calib-text", default="calibration")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--calib-context-len", type=int, default=1024)
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--plots", default=None, help="folder for one heatmap PNG per method")
    p.add_argument("--save-items", action="store_true", help="per-item results in the JSON")
    p.add_argument("--resume", default=None,
                   help="a JSON of an earlier run of the same protocol (e.g. one stopped by a time limit: the JSON is "
                        "written after every method): its finished methods are taken from it, the rest run now")
    p.add_argument("--stop-after", type=float, default=None,
                   help="seconds: start no new batch after this long, write the JSON with the items done so far "
                        "and stop; --resume continues item by item (for time-limited machines)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: lengths 256,512, 2 depths, 1 sample, full / antkv-1 / kivi-2, KL on 1 x 256 "
                        "tokens, codebooks from 2048 tokens (artifacts/<model>-quick), rewritten graphs run eagerly")


def apply_quick(args) -> None:
    """--quick: a CI-sized grid. Options set to something other than their default still win."""
    if not args.quick:
        return
    import argparse

    ref = argparse.ArgumentParser()
    add_arguments(ref)
    defaults = vars(ref.parse_args([]))
    quick = {"lengths": "256,512", "depths": 2, "samples": 1, "methods": "quick", "kl_windows": 1, "kl_len": 256,
             "calib_tokens": 2048, "inner": "eager", "distractors": 1, "batch": 6,
             "artifacts": f"artifacts/{'smollm2' if args.model == 'smollm2' else Path(args.model).name}-quick"}
    if args.model.startswith("tiny-"):  # character tokens: the prompts' fixed text alone is ~450 tokens
        quick.update(calib_context_len=256, calib_tokens=1024, lengths="512,768")
    for k, v in quick.items():
        if getattr(args, k) == defaults[k]:
            setattr(args, k, v)
