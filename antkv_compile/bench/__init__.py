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

Layout: ``common`` (configurations, constants, helpers), ``model`` (model and cache set-up), ``check`` (the
decode check), ``core`` / ``points`` / ``runs`` / ``report`` (the benchmark object, one job each, composed in
``runner.Bench``), ``cli`` (arguments, ``--plan-only``, ``--merge``, ``main``).
"""
from __future__ import annotations

from .check import DecodeChecker, reference_slice
from .cli import add_arguments, main, merge, plan_only, run
from .common import (
    CODEBOOK_NOTE, CONFIGS, DEFAULT_RUNS, RUNS, SCHEMA, TARGET_CAPACITY, TARGET_SPEEDUP, WEIGHTS_NOTE, ConfigSpec,
    Progress, batch_list, parse_size, print_table,
)
from .model import build_model, cache_position, copy_bandwidth, dense_bytes, model_config, new_cache, set_position
from .runner import Bench

__all__ = ["Bench", "CODEBOOK_NOTE", "CONFIGS", "ConfigSpec", "DEFAULT_RUNS", "DecodeChecker", "Progress", "RUNS",
           "SCHEMA", "TARGET_CAPACITY", "TARGET_SPEEDUP", "WEIGHTS_NOTE", "add_arguments", "batch_list", "build_model",
           "cache_position", "copy_bandwidth", "dense_bytes", "main", "merge", "model_config", "new_cache",
           "parse_size", "plan_only", "print_table", "reference_slice", "run", "set_position"]
