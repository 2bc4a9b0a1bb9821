"""``backend="antkv"``: a torch.compile backend that compresses the KV cache of Hugging Face models.

``torch.compile(model, backend="antkv", options={...})`` works after ``pip install`` without importing
this package: ``pyproject.toml`` registers :func:`antkv_backend` in the ``torch_dynamo_backends``
entry-point group (a plain, undecorated callable: decorating it with ``register_backend`` would make
torch's lookup register it twice).

Per Dynamo graph:

1. ``find_attention_sites`` (``antkv_compile.patterns``) pairs static-cache writes with the attention that
   reads them; ``plan_rewrite`` decides to rewrite all of them or none (see :mod:`antkv_compile.passes`).
2. Rewrite: each site becomes ``torch.ops.antkv_rt.cache_attend`` (the method core's store); the rest of
   the graph goes to Inductor (``compile_fx``) as usual, with ``mode``/``options`` mapped to
   ``config_patches`` and :class:`~antkv_compile.passes.cache_key.ConfigKeyPass` in the cache key.
3. Fallback: no site / a site we cannot rewrite -> the *untouched* graph goes to ``compile_fx`` exactly as
   ``backend="inductor"`` would, with one warning naming the reason.
4. The returned callable binds each layer's store to the live cache tensors of this call, offers the
   session this call's dense StaticCache K/V buffers, runs the compiled graph, then releases those
   buffers (the rewritten graph no longer uses them; after prefill the KV memory is codes + anchors +
   window + codebooks).
5. Eager prefill (``generate(compile_config=CompileConfig(backend="antkv"))``: transformers runs the prompt
   uncompiled and only the decode steps compiled): the first compiled step finds no store for a cache at a
   position > 0 and *re-homes* the prefix from the dense buffers offered in step 4, still unreleased
   (:meth:`~antkv_compile.runtime.state.Session._rehome_prefix`). The prompt's own queries were never seen,
   so the prefix cannot be scored by them. Policy: the prefix enters the store's full-precision window
   without queries and is scored at its flush only by the queries of compiled steps that arrived while it
   was in the window -- for a prompt longer than ``window``, the first compiled step's queries alone (the
   flush happens in that step). The first compiled step attends over the prefix exactly. Without an
   artifact the codebooks are learned from the prefix. The first step sees the dense buffers unreleased and
   the next ones released, so the decode graph compiles twice (2 graphs, as with a compiled prefill). To
   score the prompt with its own queries instead, let transformers compile the prefill too:
   ``generate(..., prefill_chunk_size=N)`` with N >= the prompt length runs it through the compiled forward.
   A dense cache already released (a compiled model ran on it) with no store raises ``StoreStateError``.

Options (``options=`` of torch.compile; other keys go to Inductor): ``artifact`` (a
``CodebookArtifact`` or a directory), ``bits`` ("1"), ``anchor_ratio`` (0.01), ``window`` (64), and the
other :class:`~antkv_compile.config.AnTKVConfig` fields (``flush``, ``score``, ``value_mode``,
``coded_path``, ``seed``, ``capacity`` -- store tokens per sequence when larger than the static cache,
``store`` -- "auto"/"kernels"/"reference"), ``allow_model_mismatch`` (False: an artifact is checked against
the graph's model before compiling -- geometry, RoPE, family, weight fingerprint; True accepts an artifact
of another model of the same geometry), ``release_dense`` (True), ``inner`` ("inductor"; "eager" runs the rewritten
graph without Inductor -- for debugging and fast tests).
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch

log = logging.getLogger("antkv_compile.backend")

__all__ = ["antkv_backend", "AntKVFallbackWarning", "AntKVCalibrationWarning", "parse_options", "last_compiles"]

_OUR_KEYS = {f.name for f in dataclasses.fields(__import__("antkv_compile.config", fromlist=["AnTKVConfig"]).AnTKVConfig)}
_OUR_KEYS |= {"artifact", "release_dense", "inner", "allow_model_mismatch"}


class AntKVFallbackWarning(UserWarning):
    """A graph was compiled by plain Inductor (nothing rewritten), or some layers were kept exact."""


class AntKVCalibrationWarning(UserWarning):
    """No codebook artifact: codebooks are learned from the prefill itself."""


# one record per backend call (most recent last; bounded): what explain/tests inspect
last_compiles: list = []
_WARNED: set = set()


def _warn_once(message: str, category) -> None:
    if message in _WARNED:
        return
    _WARNED.add(message)
    log.warning("%s", message)
    warnings.warn(message, category, stacklevel=3)


class _RecompileLimitWatch(logging.Filter):
    """Turns Dynamo's "hit config.recompile_limit" log record into one antkv warning: from then on that frame runs
    eagerly, i.e. with the dense, uncompressed cache, and nothing of this package runs to say so otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "torch._dynamo hit config." in str(record.msg):
            args = record.args if isinstance(record.args, tuple) else ()
            limit = f"{args[0]}={args[1]}" if len(args) >= 2 else "its recompile limit"
            function = str(args[2]) if len(args) >= 3 else "a compiled function"
            _warn_once(f"antkv: Dynamo stopped compiling {function} after {limit}; its later calls run eagerly "
                       "with the dense, UNCOMPRESSED KV cache. Raise torch._dynamo.config.recompile_limit, or keep "
                       "the shapes that change between calls few (one StaticCache length, a fixed batch)",
                       AntKVFallbackWarning)
        return True


_WATCH = _RecompileLimitWatch()


def _watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCH not in logger.filters:
        logger.addFilter(_WATCH)


def parse_options(options: dict | None):
    """Split torch.compile ``options`` into (AnTKVConfig, artifact or None, release_dense, inductor options)."""
    from .config import AnTKVConfig
    from .options import check_option_keys

    options = dict(options or {})
    check_option_keys(options, _OUR_KEYS)
    ours = {k: options.pop(k) for k in list(options) if k in _OUR_KEYS}
    artifact = ours.pop("artifact", None)
    release = bool(ours.pop("release_dense", True))
    inner = ours.pop("inner", "inductor")
    allow_mismatch = bool(ours.pop("allow_model_mismatch", False))
    if inner not in ("inductor", "eager"):
        raise ValueError(f"options['inner'] must be 'inductor' or 'eager', got {inner!r}")
    if artifact is not None and not hasattr(artifact, "keys"):
        from .artifact import load_artifact

        artifact = load_artifact(artifact)
    if artifact is not None and getattr(artifact, "key_space", "post_rope") == "pre_rope":
        artifact.check_key_layout()  # refuses old dense-map pre-RoPE codebooks: recalibrate
        ours.setdefault("key_space", "pre_rope")  # the artifact decides how keys are coded
    if ours.get("key_space") == "pre_rope":
        ours.setdefault("coded_path", "dequantized")  # pre-RoPE keys are rotated back after decoding
    config = AnTKVConfig(**ours)
    if artifact is not None:
        artifact.check_preset(config.bits)
        if config.key_space != artifact.key_space:
            raise ValueError(f"options ask for key_space={config.key_space!r} but the artifact codes keys "
                             f"{artifact.key_space}; drop the option or use a matching artifact")
    elif config.key_space == "pre_rope":
        raise ValueError("key_space='pre_rope' needs a calibrated artifact (it carries the model's RoPE); "
                         "antkv-compile calibrate --pre-rope ...")
    options["__inner"] = inner
    options["__allow_model_mismatch"] = allow_mismatch
    return config, artifact, release, options


def _config_patches(mode: str | None, inductor_options: dict) -> dict:
    patches: dict = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(inductor_options)
    return patches


def _compile_fx(gm, example_inputs, patches, inner="inductor"):
    if inner == "eager":  # debugging / fast tests: run the (rewritten) graph as is, no Inductor
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None)


def antkv_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """The ``antkv`` torch.compile backend (see the module docstring)."""
    from .cache_fit import guarded, oversized_write, position_guard, raising
    from .passes import apply_rewrite, plan_rewrite
    from .passes.cache_key import ConfigKeyPass
    from .patterns import find_attention_sites
    from .runtime.state import release_dense, session_for

    config, artifact, release, inductor_options = parse_options(options)
    _watch_recompile_limit()
    inner = inductor_options.pop("__inner")
    allow_mismatch = inductor_options.pop("__allow_model_mismatch")
    patches = _config_patches(mode, inductor_options)
    report = find_attention_sites(gm)
    plan = plan_rewrite(report)
    record = {"report": report, "plan": plan, "before": gm, "after": None, "mode": mode}
    last_compiles.append(record)
    del last_compiles[:-32]
    log.info("%s", report.summary())

    def unchanged(reason: str):
        too_long = oversized_write(gm)
        if too_long:  # Inductor's dense write would go out of bounds and abort the process (cache_fit.py)
            return raising(too_long)
        _warn_once(f"antkv: graph compiled unchanged by {inner} (KV cache NOT compressed) -- {reason}",
                   AntKVFallbackWarning)
        return guarded(_compile_fx(gm, example_inputs, patches, inner), position_guard(gm))

    if not plan.rewrites:
        return unchanged(plan.fallback_reason)

    # tensor parallelism: which global KV heads this rank's graph holds (None: every head, not sharded)
    from .tensor_parallel import kv_shard

    shard, layout_problem = kv_shard(gm, example_inputs, plan.sites)
    if layout_problem:
        record["plan"] = dataclasses.replace(plan, sites=(), fallback_reason=f"tensor_parallel_layout: {layout_problem}")
        return unchanged(record["plan"].fallback_reason)
    record["shard"] = shard
    if artifact is not None:  # before compiling: an artifact of another model is refused now, not after Inductor
        from .model_facts import facts_from_graph

        artifact.check_graph(facts_from_graph(gm, example_inputs, plan.sites, shard), allow_mismatch)
        if shard is not None:  # each rank codes its own KV heads with their codebooks
            artifact = artifact.for_kv_heads(shard)
    session = session_for(config, artifact)
    record["session"] = session
    if plan.kept_exact:
        layers = sorted({u.layer for u in plan.kept_exact if u.layer is not None})
        _warn_once(f"antkv: {len(plan.kept_exact)} sliding-window attention layer(s) {layers} kept exact (full-"
                   f"precision dense cache); {len(plan.sites)} global layer(s) compressed", AntKVFallbackWarning)
    if artifact is None:
        _warn_once("antkv: no codebook artifact given; codebooks are learned per layer from the prefill's own "
                   "keys and values (plain k-means, lower quality). Calibrate once and pass it: `antkv-compile "
                   "calibrate --model <model> --bits %s --out <dir>` then options={'artifact': '<dir>'}" % config.preset.name,
                   AntKVCalibrationWarning)
    result = apply_rewrite(gm, plan, session.sid)
    record["after"] = result.gm
    log.debug("rewritten graph:\n%s", result.gm.code)

    user_pass = patches.get("post_grad_custom_post_pass")
    patches["post_grad_custom_post_pass"] = ConfigKeyPass(session.fingerprint, user_pass)
    if patches.get("triton.cudagraphs"):
        # the store is host-side state and reads positions on the host: not CUDA-graph capturable
        log.warning("antkv: CUDA graphs disabled for a rewritten graph (the store runs on the host)")
        patches["triton.cudagraphs"] = False
    with torch.no_grad():  # inference only (passes/ops.py): no joint graph, no backward through the store
        compiled = _compile_fx(result.gm, example_inputs, patches, inner)

    bind = result.bind
    release_in = result.release_inputs if release else []
    release_out = result.release_outputs if release else []

    # each layer's dense K/V placeholders: offered to the session during a call, so that a store missing at a
    # position > 0 (the prompt ran uncompiled, as HF generate's compile_config does) is re-homed from them
    ph_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    dense_in = [(s.layer, ph_index[s.key_buffer], ph_index[s.value_buffer]) for s in plan.sites
                if s.key_buffer in ph_index and s.value_buffer in ph_index]

    def run(*args):
        for layer, idx in bind:
            session.bind(layer, args[idx] if idx is not None else None)
        session.offer_dense({layer: (args[ki], args[vi]) for layer, ki, vi in dense_in})
        try:
            with torch.no_grad():
                out = compiled(*args)
        finally:
            session.offer_dense(None)
        for i in release_in:
            release_dense(args[i])
        if release_out:
            flat, _ = torch.utils._pytree.tree_flatten(out)
            for i in release_out:
                release_dense(flat[i])
        return out

    run._antkv_result = result  # for inspection
    return run
