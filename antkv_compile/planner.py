"""Capacity planner: a symbolic (sympy) memory model of a model served with the AnTKV cache.

Bytes on the device, as functions of batch B and context N (tokens per sequence):

    weights    params x weight bytes
    codes      B N L Hkv (C_k + C_v) bits / 8              (C = stages x sub-spaces x code bits)
    anchors    B L Hkv (rho N + 1) (2 D e + 4 + 4)          (K, V at e bytes, int32 position, fp32 score)
               + B L Hkv N / 8                              (one anchor bit per token)
    window     B L Hkv W 2 D e                              (K, V)
    window_queries  B L Hq W (2 D e + 4)                    (the window's queries, outputs, LSE: kept for scoring)
    codebooks  L 2 Hcb (S M d' (4 + 2) + 2 D D 4 + D 4)     (fp32 centroids and the kernels' fp16 copy, the D x D
                                                            map and its inverse, mean: what the device holds)
    workspace  decode activations + logits + split-K partials, prefill chunk activations

Retrieval mode (``offload=True``, issue 19: ``options={"offload": "host"}``), on the device besides the above:

    retrieval  B L Hkv (rho N + 1 + k(N)) (2 D e + 4) + B L Hkv N / 8
                                                            (the extended anchor set the decode reads: a copy of the
                                                            anchors and k(N) = max(retrieve_min, ceil(f N)) retrieved
                                                            tokens' K, V and int32 positions; its bitmask)
    retrieval_scratch  B Hkv N 9 + 256 MiB                  (one layer's scoring: scores, masked copy, anchor mask,
                                                            a chunk of decoded keys)

and in (pinned) host memory, apart from the device budget:

    host_kv    B N L Hkv 2 D e                              (full-precision K, V of every token)

The planner answers the longest context per batch size and the largest batch per context that fit
a memory budget, and the same for a full-precision cache for comparison. It counts what this
project allocates; the benchmark of issue 5 checks it against measured peaks.

Tensor parallelism (``world_size`` N, transformers' ``tp_plan``): every term is *per rank* and the budget is
one GPU's. Each rank holds Hkv / N KV heads and Hq / N query heads (codes, anchors, window, window queries,
codebooks divide by N), the parameters of the modules in the model's ``tp_plan`` divided by N and the others
(norms) whole; activations keep the hidden size and the gathered logits whole, the MLP's intermediate width
divides. N must divide the KV heads: a rank holds whole KV heads (their codebooks are per KV head).
"""
from __future__ import annotations

import dataclasses
import math

import sympy as sp

from .config import VQPreset, get_preset

B, N = sp.symbols("B N", positive=True, integer=True)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    params: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None = None  # the model's window (config.max_position_embeddings)
    sharded_params: int | None = None  # parameters of the modules its tp_plan shards (None: unknown)

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """Shape of a transformers config; parameters counted on the meta device (no memory, no download)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(name or config.model_type, params, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.hidden_size, config.intermediate_size, config.vocab_size,
                   getattr(config, "max_position_embeddings", None), _sharded_params(model))


def _sharded_params(model) -> int:
    """Parameters of the modules that the model's tensor-parallel plan (transformers' ``tp_plan``: module name
    patterns, ``*`` for a layer index) shards; tied weights once."""
    import re

    plan = getattr(model, "tp_plan", None) or {}
    patterns = [re.compile(re.escape(k).replace(r"\*", r"\d+") + r"$") for k in plan]
    seen, total = set(), 0
    for name, module in model.named_modules():
        if name and any(p.match(name) for p in patterns):
            for param in module.parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
    return total


def check_world_size(shape: ModelShape, world_size: int) -> None:
    """Raise ValueError unless ``world_size`` ranks can each hold whole KV heads of ``shape``."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if world_size == 1:
        return
    hkv, hq = shape.num_kv_heads, shape.num_q_heads
    if hkv % world_size or hq % world_size:
        fits = [n for n in range(1, hkv + 1) if hkv % n == 0 and hq % n == 0]
        raise ValueError(
            f"tensor parallel world size {world_size} does not divide {shape.name}'s {hkv} KV heads ({hq} query "
            f"heads): each rank holds whole KV heads and their codebooks. Use a world size in {fits}")
    if shape.sharded_params is None:
        raise ValueError(f"{shape.name}: which parameters its tensor-parallel plan shards is unknown; build the shape "
                         "with ModelShape.from_config")


def llama3_8b_config():
    """Llama-3-8B's shape from transformers' own LlamaConfig (no weights involved)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 23,
                       rope_theta=500000.0, tie_word_embeddings=False)


KNOWN_MODELS = {"llama3-8b": llama3_8b_config}


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    shape: ModelShape
    preset: VQPreset | None  # None = full-precision cache
    anchor_ratio: float = 0.01
    window: int = 64
    element_bytes: int = 2  # bf16 / fp16 cache entries and activations
    weight_bytes: float = 2.0
    prefill_chunk: int = 4096
    decode_splits: int = 32
    # allocator headroom: a share of everything allocated besides the weights, kept free. Without it the largest
    # batches the planner named (181 at 1 bit, 344 at 0.375 bit, H100) ran out of memory although the peaks it
    # predicted were 0.96-1.08 of the measured ones: fragmentation and transient copies need a margin.
    headroom: float = 0.05
    world_size: int = 1  # tensor-parallel ranks: every term is per rank (module docstring)
    offload: bool = False  # the retrieval mode: + the device's exact budget, + the host copy (host_terms)
    retrieve_fraction: float = 0.02
    retrieve_min: int = 64

    def __post_init__(self) -> None:
        check_world_size(self.shape, self.world_size)

    def params_per_rank(self) -> int:
        s, n = self.shape, self.world_size
        if n == 1:
            return s.params
        return s.params - s.sharded_params + math.ceil(s.sharded_params / n)

    def terms(self) -> dict[str, sp.Expr]:
        s, e, tp = self.shape, self.element_bytes, self.world_size
        L, hkv, hq, d = s.num_layers, s.num_kv_heads // tp, s.num_q_heads // tp, s.head_dim
        inter = math.ceil(s.intermediate_size / tp)
        out: dict[str, sp.Expr] = {"weights": sp.Integer(math.ceil(self.params_per_rank() * self.weight_bytes))}
        if self.preset is None:
            out["kv_full_precision"] = B * N * L * hkv * 2 * d * e
        else:
            p = self.preset
            # codes are stored one per byte (6-bit codes too: the kernels read uint8), not bit-packed
            code_bits = 2 * p.stages * p.num_subspaces(d) * 8 * math.ceil(p.code_bits / 8)
            out["codes"] = B * N * L * hkv * sp.Rational(code_bits, 8)
            out["anchors"] = B * L * hkv * ((sp.nsimplify(self.anchor_ratio) * N + 1) * (2 * d * e + 8) + N / 8)
            out["window"] = B * L * hkv * self.window * 2 * d * e
            out["window_queries"] = B * L * hq * self.window * (2 * d * e + 4)  # kept for scoring, not read by decode
            # resident per codebook: fp32 centroids + the kernels' fp16 copy, fp32 map + inverse + mean (matches
            # session.memory_bytes() on the GPU: 168.0 MB for Llama-3-8B at 1 bit, e2e_memory_v9)
            centroids = p.stages * p.num_subspaces(d) * p.num_centroids * p.sub_dim
            per_book = hkv * (centroids * (4 + 2) + 2 * d * d * 4 + d * 4)
            out["codebooks"] = sp.Integer(L * 2 * per_book)
            if self.offload:
                k = sp.Max(self.retrieve_min, sp.ceiling(sp.nsimplify(self.retrieve_fraction) * N))
                slots = sp.ceiling(sp.nsimplify(self.anchor_ratio) * N) + k
                out["retrieval"] = B * L * hkv * (slots * (2 * d * e + 4) + N / 8)
                # one layer's step at a time: scores (fp32) + masked copy + anchor mask per coded token, and the
                # decoded-key chunk of the scoring (runtime/offload_store.py, _SCORE_BYTES)
                out["retrieval_scratch"] = B * hkv * N * 9 + (1 << 28)
        decode = B * (4 * s.hidden_size + 2 * inter) * e + B * s.vocab_size * 4
        decode += B * hq * self.decode_splits * (d + 2) * 4
        prefill = self.prefill_chunk * (4 * s.hidden_size + 3 * inter) * e + self.prefill_chunk * s.vocab_size * 4
        out["workspace"] = sp.Max(decode, prefill)
        if self.headroom:
            out["headroom"] = sp.nsimplify(self.headroom) * sum(v for k, v in out.items() if k != "weights")
        return out

    def host_terms(self) -> dict[str, sp.Expr]:
        """Bytes in host memory (the retrieval mode's full-precision copy; nothing otherwise)."""
        if not self.offload or self.preset is None:
            return {}
        s = self.shape
        return {"host_kv": B * N * s.num_layers * s.num_kv_heads * 2 * s.head_dim * self.element_bytes}

    def total(self) -> sp.Expr:
        """Device bytes (the host copy is counted apart: :meth:`host_terms`)."""
        return sum(self.terms().values())

    def bytes_at(self, batch: int, context: int) -> dict[str, int]:
        """Device bytes by term and their ``total``; in the retrieval mode also ``host_kv`` and ``host_total``."""
        at = {B: batch, N: context}
        vals = {k: int(sp.ceiling(v.subs(at))) for k, v in self.terms().items()}
        vals["total"] = sum(vals.values())
        host = {k: int(sp.ceiling(v.subs(at))) for k, v in self.host_terms().items()}
        if host:
            vals.update(host)
            vals["host_total"] = sum(host.values())
        return vals

    def fits(self, batch: int, context: int, budget: int, host_budget: int | None = None) -> bool:
        """Whether (batch, context) fits ``budget`` device bytes and, when given, ``host_budget`` host bytes."""
        vals = self.bytes_at(batch, context)
        return vals["total"] <= budget and (host_budget is None or vals.get("host_total", 0) <= host_budget)

    def longest_context(self, batch: int, budget: int, host_budget: int | None = None) -> int:
        """Largest N with total(batch, N) <= budget (and host bytes <= host_budget) (0 if not even one token fits)."""
        return _largest(lambda n: self.fits(batch, n, budget, host_budget))

    def largest_batch(self, context: int, budget: int, host_budget: int | None = None) -> int:
        """Largest B with total(B, context) <= budget (and host bytes <= host_budget) (0 if not one sequence fits)."""
        return _largest(lambda b: self.fits(b, context, budget, host_budget))


def _largest(fits) -> int:
    """Largest positive integer x with fits(x), for a monotone predicate (doubling, then bisection)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parse_bytes(text: str) -> int:
    """'80GB' / '80GiB' / '79.2e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    t = text.strip().upper().replace(" ", "")
    units = {"GIB": 1 << 30, "MIB": 1 << 20, "GB": 10**9, "MB": 10**6, "TB": 10**12, "B": 1}
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(float(t))


def _n(x) -> str:
    x = float(x)
    return f"{round(x):,}" if x == int(x) or abs(x) >= 100 else f"{x:,.2f}"


def _linear_b(expr) -> str:
    """``c1 B + c0`` with thousands separators."""
    p = sp.Poly(sp.expand(expr), B)
    c1, c0 = (p.coeff_monomial(B), p.coeff_monomial(1))
    return " + ".join(t for t in ((f"{_n(c1)} B" if c1 else ""), (_n(c0) if c0 else "")) if t) or "0"


def formula(mm: MemoryModel) -> str:
    """The total as a readable line: fixed + per sequence x B + per token x B x N (+ workspace), in bytes."""
    terms = mm.terms()
    ws = sp.Symbol("W")
    total = sum(v.subs(terms["workspace"], ws) if k != "workspace" else ws for k, v in terms.items())
    # the retrieval mode's k(N) = max(retrieve_min, ceil(f N)) read as f N: the formula of long contexts
    total = total.replace(lambda e: isinstance(e, sp.Max) and e.has(N),
                          lambda e: next(a for a in e.args if a.has(N))).replace(sp.ceiling, lambda x: x)
    total = sp.expand(total)
    poly = sp.Poly(total, B, N, ws)
    coef = {m: c for m, c in zip(poly.monoms(), poly.coeffs())}
    parts = [_n(coef.get((0, 0, 0), 0)), f"{_n(coef.get((1, 0, 0), 0))} B", f"{_n(coef.get((1, 1, 0), 0))} B N"]
    ws_args = terms["workspace"].args if isinstance(terms["workspace"], sp.Max) else (terms["workspace"],)
    ws_text = "max(" + ", ".join(_linear_b(a) for a in ws_args) + ")"
    k = coef.get((0, 0, 1), 1)
    parts.append(f"{_n(k)} x {ws_text}" if k != 1 else ws_text)
    return " + ".join(parts)


def beyond_window(shape: ModelShape, context: int) -> bool:
    return bool(shape.max_positions) and context > shape.max_positions


def window_note(shape: ModelShape) -> str:
    """What a context beyond the model's window means (max_position_embeddings)."""
    return (f"beyond {shape.name}'s window of {shape.max_positions:,} positions (max_position_embeddings): the memory "
            f"would hold that many tokens, but the model attends to at most {shape.max_positions:,}")


def plan(shape: ModelShape, bits: str | None, budget: int, batches=(1, 8, 32, 128), contexts=(8192, 32768, 131072, 1 << 20),
         host_budget: int | None = None, **kw) -> dict:
    """Longest context per batch and largest batch per context in ``budget`` device bytes (and, in the retrieval
    mode ``offload=True``, ``host_budget`` host bytes)."""
    mm = MemoryModel(shape, get_preset(bits) if bits else None, **kw)
    longest = {b: mm.longest_context(b, budget, host_budget) for b in batches}
    return {
        "model": shape.name, "bits": bits or "16 (full precision)", "budget_bytes": budget,
        "world_size": mm.world_size, "budget_is": "per rank (one GPU)",
        "offload": mm.offload, "host_budget_bytes": host_budget,
        "symbolic_total_bytes": str(sp.simplify(mm.total())),
        "formula": formula(mm),
        "max_position_embeddings": shape.max_positions,
        "longest_context": longest,
        "longest_usable_context": {b: min(n, shape.max_positions) if shape.max_positions else n for b, n in longest.items()},
        "largest_batch": {n: mm.largest_batch(n, budget, host_budget) for n in contexts},
    }
