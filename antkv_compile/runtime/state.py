"""Where the quantized KV state of a compiled model lives.

Design (documented opaque op, see also :mod:`antkv_compile.passes.ops`):

* A :class:`Session` exists per quantization configuration (config + artifact fingerprint). The backend
  gets (or creates) the session from its options, so the prefill graph and the decode graph of one model
  (two separate backend calls) share it. The session id is a constant argument of every ``antkv`` op in
  the rewritten graph, so graphs compiled for different configurations differ (and so do their Inductor
  cache keys, see :mod:`antkv_compile.passes.cache_key`).
* Per (layer, cache identity) the session holds one method-core store
  (:class:`antkv_compile.numerics.store.AnTKVLayerStore`): codes + anchors + window, fixed capacity =
  the static cache length. The store lives *outside* the graph, in Python; the op reaches it through
  ``(session, layer)`` plus the *cache identity* that the backend's wrapper binds before each call
  (``id`` of the live ``cumulative_length`` tensor of that layer, or of its key buffer), so two
  ``StaticCache`` objects used with one compiled model get two stores.
* The op is a pure function of its tensor inputs when the new tokens start at position 0 (it starts a
  fresh store: a new prompt / ``cache.reset()``), and otherwise requires the store to hold exactly
  ``position`` tokens (raises :class:`StoreStateError` else) -- so a skipped or repeated step is an
  error, never a silently wrong result.
* Codebooks: from the artifact (per layer), or learned per layer from the first prefill's own keys and
  values (k-means in raw space, a weaker fallback; the backend warns once and names calibration).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from ..config import AnTKVConfig
from ..numerics.store import AnTKVLayerStore, CacheInputError, StoreGeometry
from ..numerics.vq import Codebook

log = logging.getLogger("antkv_compile.backend")

__all__ = ["Session", "StoreStateError", "get_session", "session_for", "release_dense", "config_fingerprint"]


class StoreStateError(RuntimeError):
    """The compiled step does not continue the store it should (skipped/repeated step, eager prefill)."""


def _artifact_fingerprint(artifact) -> str:
    if artifact is None:
        return "self-learned"
    m = artifact.manifest
    base = str(m.get("tensors_sha256") or hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest())
    heads = m.get("kv_heads")  # a tensor-parallel rank's slice of the codebooks is another configuration
    return base if heads is None else f"{base}:kv_heads={heads['start']}+{heads['count']}/{heads['of']}"


def config_fingerprint(config: AnTKVConfig, artifact) -> str:
    """A stable string naming the quantization configuration (part of every compile-cache key)."""
    d = dataclasses.asdict(config)
    d["bits"] = dataclasses.asdict(config.preset)
    payload = json.dumps({"config": d, "artifact": _artifact_fingerprint(artifact)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _learn_codebook(x: Tensor, config: AnTKVConfig, layer: int) -> Codebook:
    """Codebook from the prefill's own vectors x [B, H, T, D] (per KV head, raw space, unweighted)."""
    from ..numerics.codebook_learning import LearningOptions, learn_codebook

    preset = config.preset
    b, h, t, d = x.shape
    data = x.detach().float().permute(1, 0, 2, 3).reshape(h, b * t, d)
    m = preset.num_centroids
    if data.shape[1] < m:  # fewer vectors than centroids: tile them (with a tiny jitter) so k-means can seed
        reps = math.ceil(m / data.shape[1])
        gen = torch.Generator().manual_seed(config.seed * 7919 + layer)
        tiled = data.repeat(1, reps, 1)
        jitter = torch.randn(tiled.shape, generator=gen).to(tiled.device) * (1e-4 * (data.std() + 1e-6))
        data = tiled + jitter
    gen = torch.Generator().manual_seed(config.seed * 1000 + layer)
    opts = LearningOptions(weighted=False, metric=False, rotate=False, iters=8)
    return learn_codebook(data, None, preset, options=opts, generator=gen)


class Session:
    """The stores and codebooks of one quantization configuration."""

    def __init__(self, sid: int, config: AnTKVConfig, artifact=None, check_mask: bool = True) -> None:
        self.sid = sid
        self.config = config
        self.artifact = artifact
        self.fingerprint = config_fingerprint(config, artifact)
        self.check_mask = check_mask
        self.codebooks: dict[int, tuple[Codebook, Codebook]] = {}
        self.stores: dict[tuple[int, Any], AnTKVLayerStore] = {}
        self.current: dict[int, Any] = {}  # layer -> cache identity bound by the wrapper for this call
        self._finalizers: dict[Any, Any] = {}
        self.orphans: dict[int, AnTKVLayerStore] = {}  # layer -> store whose cache identity died (see _drop)
        self.learned_layers: set[int] = set()
        self._step_facts = None  # (layer, key, start, causal) of this forward (passes.ops.step_facts)

    # ------------------------------------------------------------------ binding (called by the wrapper)
    def bind(self, layer: int, tensor: Tensor | None) -> None:
        if tensor is None:
            self.current[layer] = None
            return
        key = id(tensor)
        self.current[layer] = key
        if key not in self._finalizers:
            self._finalizers[key] = weakref.finalize(tensor, self._drop, key)

    def _drop(self, key) -> None:
        """The identity tensor of a cache died. Its stores become the layers' *orphans* (one per layer, the
        newest): some transformers versions replace the identity tensor between steps (a new
        ``cumulative_length`` object per step, seen with transformers 5.17 on CUDA), so the next step may come
        back under a new identity holding exactly an orphan's length, and adopts it. An orphan is freed by the
        next fresh store of its layer (a new prompt)."""
        self._finalizers.pop(key, None)
        for k in [k for k in self.stores if k[1] == key]:
            self.orphans[k[0]] = self.stores.pop(k)

    # ------------------------------------------------------------------ codebooks / stores
    def codebooks_for(self, layer: int, k: Tensor, v: Tensor) -> tuple[Codebook, Codebook]:
        """Artifact codebooks (cached per layer), or -- without an artifact -- codebooks learned from this
        prefill's own keys and values (learned anew at every store start: a new prompt, a new cache)."""
        if self.artifact is not None and layer in self.codebooks:
            return self.codebooks[layer]
        if self.artifact is not None:
            if layer >= self.artifact.num_layers:
                raise CacheInputError(
                    f"the codebook artifact has {self.artifact.num_layers} layers but layer {layer} is rewritten; "
                    "use an artifact calibrated for this model (antkv-compile calibrate)")
            cbs = (self.artifact.keys[layer], self.artifact.values[layer])
        else:
            cbs = (_learn_codebook(k, self.config, layer), _learn_codebook(v, self.config, layer))
            self.learned_layers.add(layer)
            log.debug("session %d: learned layer %d codebooks from %d prefill tokens", self.sid, layer, k.shape[2])
        self.codebooks[layer] = cbs
        return cbs

    def store_kind(self, device: torch.device) -> str:
        """"kernels" or "reference": which store serves this session's layers on ``device``."""
        from .kernel_store import kernels_support

        want = self.config.store
        reason = kernels_support(self.config)
        if want == "kernels" and reason:
            raise ValueError(f"options store='kernels' but the kernels do not support {reason}; "
                             "use store='auto' or 'reference'")
        if want == "auto":
            want = "kernels" if device.type == "cuda" and reason is None else "reference"
        return want

    def new_store(self, geom: StoreGeometry, cbk: Codebook, cbv: Codebook, layer: int):
        rope = self.artifact.rope_table() if self.config.key_space == "pre_rope" else None
        kernels = self.store_kind(geom.device) == "kernels"
        if self.config.offload == "host":  # the retrieval mode: a full-precision copy in host memory
            from .host_kv import PinnedHostKV

            host = PinnedHostKV(geom)
            if kernels:
                from .offload_store import OffloadKernelStore

                return OffloadKernelStore(geom, cbk, cbv, self.config, layer_index=layer, rope=rope, host=host)
            from ..numerics.retrieval import RetrievalLayerStore

            return RetrievalLayerStore(geom, cbk, cbv, self.config, layer_index=layer, rope=rope, host=host)
        if kernels:
            from .kernel_store import KernelLayerStore

            return KernelLayerStore(geom, cbk, cbv, self.config, layer_index=layer, rope=rope)
        return AnTKVLayerStore(geom, cbk, cbv, self.config, layer_index=layer, rope=rope)

    def store_for(self, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int, capacity: int,
                  scale: float) -> AnTKVLayerStore:
        key = (layer, self.current.get(layer))
        store = self.stores.get(key)
        if start == 0:
            self.orphans.pop(layer, None)
            cbk, cbv = self.codebooks_for(layer, k, v)
            b, h, _, d = k.shape
            geom = StoreGeometry(b, h, d, self.config.capacity or capacity, k.dtype, k.device, scale)
            store = self.new_store(geom, cbk, cbv, layer)
            self.stores[key] = store
            return store
        if store is None and layer in self.orphans and len(self.orphans[layer]) == start:
            store = self.orphans.pop(layer)
            self.stores[key] = store
        if store is None and key[1] is not None and (layer, None) in self.stores:
            # the prefill graph created the cache lazily (its buffers were not graph inputs, so that call had no
            # identity to bind): the first step on a bound cache adopts that store
            store = self.stores.pop((layer, None))
            self.stores[key] = store
        if store is None:
            # the prefix was written eagerly (HF generate's uncompiled prefill): re-home it from the dense cache
            store = self._rehome_prefix(layer, q, k, start, capacity, scale)
            if store is None:
                raise StoreStateError(
                    f"layer {layer}: the compiled step writes position {start} but no antkv store holds this "
                    "cache's earlier tokens, and the dense cache that held them was already released (or is not "
                    "an input of this graph). The prompt (prefill) must run through the same compiled model: "
                    "compile the whole model (torch.compile(model, backend='antkv') / "
                    "model.compile(backend='antkv')), not only the decode step "
                    f"[bound cache identity {key[1]}; this layer's stores: {[i for l, i in self.stores if l == layer]}]")
            self.stores[key] = store
        if len(store) != start:
            raise StoreStateError(
                f"layer {layer}: the antkv store holds {len(store)} tokens but the cache writes position {start}; "
                "a step was skipped or repeated (cache cropping / beam reordering is not supported)")
        return store

    # ------------------------------------------------------------------ re-homing an eagerly written prefix
    def offer_dense(self, buffers: dict[int, tuple[Tensor, Tensor]] | None) -> None:
        """The backend's wrapper hands over, for the duration of one compiled call, each rewritten layer's
        dense StaticCache K/V buffers (``{layer: (keys, values)}``; ``None`` withdraws them). They are read
        only when a layer's store is missing at a position > 0 (:meth:`_rehome_prefix`), and must be offered
        before the wrapper releases them."""
        self._dense_offer = dict(buffers) if buffers else {}

    def _dense_prefix(self, layer: int, start: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """Positions 0..start-1 of the offered dense K/V of ``layer`` ([B, Hkv, start, D] copies), or None
        when none was offered, it was released (a stride-0 one-element view), or its shape does not fit."""
        kv = getattr(self, "_dense_offer", {}).get(layer)
        if kv is None:
            return None
        out = []
        for t in kv:
            if (not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != like.shape[0]
                    or t.shape[1] != like.shape[1] or t.shape[3] != like.shape[3] or t.shape[2] < start
                    or any(s == 0 for s in t.stride())
                    or t.untyped_storage().nbytes() < t.numel() * t.element_size()):
                return None
            out.append(t[:, :, :start].to(like.dtype, copy=True))
        return out[0], out[1]

    def _rehome_prefix(self, layer: int, q: Tensor, k: Tensor, start: int, capacity: int, scale: float):
        """A fresh store holding the ``start`` tokens an *uncompiled* prefill wrote into the dense StaticCache
        (``generate(compile_config=...)`` runs the prompt eagerly and only the decode steps compiled), or None.

        Policy (the prompt's own queries were never seen, so they cannot score it): the prefix enters the
        store's full-precision window *without queries* (its rows carry log-normaliser +inf, so they add
        nothing to any Anchor Score). It is then scored, like every window token, at its flush -- but only
        over the queries of the compiled steps that arrived while it was in the window: for a prefix longer
        than the window that is the first compiled step's queries alone (the flush happens in that step).
        Codebooks are the artifact's, or (no artifact) learned from this prefix. The first compiled step
        attends over the whole prefix exactly; with ``anchor_ratio=1.0`` every token stays exact as usual."""
        prefix = self._dense_prefix(layer, start, k)
        if prefix is None:
            return None
        k_pre, v_pre = prefix
        cbk, cbv = self.codebooks_for(layer, k_pre, v_pre)
        b, h, _, d = k.shape
        geom = StoreGeometry(b, h, d, self.config.capacity or capacity, k.dtype, k.device, scale)
        store = self.new_store(geom, cbk, cbv, layer)
        _seed_window(store, q, k_pre, v_pre, self.config.check_finite)
        log.info("session %d: layer %d re-homed %d eagerly written prefix tokens from the dense cache",
                 self.sid, layer, start)
        return store

    def memory_bytes(self) -> dict[str, int]:
        """Tensor storage bytes held by the stores: codes, anchors (with the kernels' bitmask), the window and its
        queries, the codebooks and RoPE tables in the dtypes the stores use, and (kernel store) the decode scratch
        and CUDA-graph buffers. Counted from the stores, which hold their device's copies: the session's own
        codebooks are the artifact's (host) tensors when the stores live on a GPU, and the same tensors as the
        stores' on a CPU."""
        seen: set[int] = set()
        out = {"codes": 0, "anchors": 0, "window_kv": 0, "window_queries": 0, "codebooks": 0, "scratch": 0}
        host = 0  # the retrieval mode's full-precision copy (host memory: reported apart, under "host_kv")

        def add(kind, t):
            if not isinstance(t, Tensor):
                return
            st = t.untyped_storage()
            if st.data_ptr() in seen:
                return
            seen.add(st.data_ptr())
            out[kind] += st.nbytes()

        for s in [*self.stores.values(), *self.orphans.values()]:
            add("codes", s.codes_k)
            add("codes", s.codes_v)
            for t in (s.anchor_k, s.anchor_v, s.anchor_pos, s.anchor_score, getattr(s, "anchor_bits", None),
                      getattr(s, "n_coded_t", None)):
                add("anchors", t)
            for t in (s.win_k, s.win_v):
                add("window_kv", t)
            for t in (s.win_q, s.win_out, s.win_lse):  # the window's queries, kept to score it at flush
                add("window_queries", t)
            for name, t in (getattr(s, "_slabs", None) or {}).items():  # the window's buffers (kernel store)
                add("window_kv" if name in ("win_k", "win_v") else "window_queries", t)
            for t in (getattr(s, "ext_k", None), getattr(s, "ext_v", None), getattr(s, "ext_pos", None),
                      getattr(s, "ext_bits", None)):  # the retrieval mode's exact budget on the device
                add("anchors", t)
            if getattr(s, "host", None) is not None:
                host += s.host.nbytes()
            for cb in (s.cb_k, s.cb_v):
                for t in cb.tensors():  # (astuple would count deep copies)
                    add("codebooks", t)
            for t in (getattr(s, "cent_k", None), getattr(s, "cent_v", None), *getattr(s, "_cb32", ()),
                      *(getattr(s, "rope_keys", None) or ()), getattr(s, "rope_inv_freq", None),
                      getattr(s.rope, "inv_freq", None) if s.rope is not None else None):
                add("codebooks", t)
            add("scratch", getattr(s, "_win_len", None))
            for t in (getattr(s, "_workspace", None) or {}).values():  # decode scratch shared by a device's stores
                add("scratch", t)
            graph = getattr(s, "_graph", None)  # (key, CUDA graph, static query, out, lse, plan)
            if graph is not None:
                for t in graph[2:5]:
                    add("scratch", t)
        if host:
            out["host_kv"] = host
        return out


def _seed_window(store, q: Tensor, k: Tensor, v: Tensor, check_finite: bool = True) -> None:
    """Put ``k``/``v`` [B, Hkv, n, D] into an empty store's window as tokens that no query has read yet.

    Their query rows are zeros with log-normaliser +inf and output 0: in the Anchor Score (any kind) their
    attention weight exp(s - lse) is 0, so only queries that arrive later score them."""
    if len(store):
        raise StoreStateError("can only seed the window of an empty store")
    b, hq, _, d = q.shape
    n = k.shape[2]
    q0 = q.new_zeros(b, hq, n, d)
    store._validate(q0, k, v, check_finite)
    store.win_k, store.win_v = k, v
    store.win_q = q0
    store.win_out = torch.zeros(b, hq, n, d, dtype=torch.float32, device=q.device)
    store.win_lse = torch.full((b, hq, n), float("inf"), dtype=torch.float32, device=q.device)


_LOCK = threading.Lock()
_SESSIONS: dict[int, Session] = {}
_BY_FINGERPRINT: dict[str, int] = {}


def session_for(config: AnTKVConfig, artifact=None) -> Session:
    """The session of this configuration (created on first use; stable for the process)."""
    fp = config_fingerprint(config, artifact)
    with _LOCK:
        sid = _BY_FINGERPRINT.get(fp)
        if sid is None:
            sid = len(_SESSIONS) + 1
            _SESSIONS[sid] = Session(sid, config, artifact)
            _BY_FINGERPRINT[fp] = sid
        return _SESSIONS[sid]


def get_session(sid: int) -> Session:
    try:
        return _SESSIONS[sid]
    except KeyError:
        raise StoreStateError(f"no antkv session {sid} in this process (a compiled artifact from another "
                              "process was loaded?); recompile with backend='antkv'") from None


def release_dense(t: Tensor) -> bool:
    """Give back the storage of a dense cache buffer the rewritten graph no longer reads or writes.

    The tensor object stays (HF's cache holds it and Dynamo guards on it) but becomes a stride-0 view of
    one element: ``cache.reset()`` (``zero_``) still works, any dense write (``index_copy_``) raises
    instead of writing, so a graph that was *not* rewritten can never silently use a released cache.
    Returns True when storage was released."""
    if not isinstance(t, Tensor) or t.numel() <= 1 or all(s == 0 for s in t.stride()):
        return False
    with torch.no_grad():
        t.set_(torch.zeros(1, dtype=t.dtype, device=t.device).untyped_storage(), 0, t.shape, (0,) * t.dim())
    return True
