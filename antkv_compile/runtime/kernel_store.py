"""The layer store the compiled model uses on the GPU: the reference store's layout, driven by the kernels.

:class:`KernelLayerStore` keeps exactly the buffers of
:class:`antkv_compile.numerics.store.AnTKVLayerStore` (codes, anchors, window with its queries) plus
what the kernels read on the device (an anchor bitmask and the coded length as int32 tensors, the
codebooks in the kernels' dtypes), and replaces the two expensive steps by the ``antkv::`` ops of
:mod:`antkv_compile.kernels.ops` (Triton on CUDA, the PyTorch references on CPU -- which is how CI tests
this class):

* **decode** (``G * T <= 64`` query rows per KV head): one ``antkv::decode_attention`` over the codes
  (lookup tables), the anchors and the window with the new tokens (exact), merged inside the kernel;
* **long chunks** (prefill, chunked prefill): the prefix (codes decoded, anchors restored at their
  positions, then the window) is attended without a mask by FlashAttention (``aten`` flash with its
  log-sum-exp; the plain reference off CUDA), the chunk itself causally by ``antkv::prefill_attention``,
  and the two partials merged by log-sum-exp. Decoding the prefix costs one [n, D] buffer per head for
  the call; it is not kept.
* **flush** (window full): ``antkv::window_flush`` encodes the oldest tokens, scores them over the
  window's queries (Anchor Score kernel; rows beyond ``score_band`` sampled every ``score_row_stride``-th, which
  only a long chunk has) and merges them into the anchors, all in place.
* **CUDA graphs** (CUDA, decode of tokens that fit the window's buffers): the decode launches of a layer (prologue,
  coded kernel, exact programs + merge) are captured once into a CUDA graph over the store's own buffers (a static
  query buffer, the window's length in a device tensor) and replayed every step: the launches cost ~0.5 ms of host
  time per layer and step, which left the GPU idle in a host-bound Llama-3-8B step (NOTES.md "Exact programs, merge
  and launches (decode)"). A change of any buffer (a window reallocated by a long chunk) captures again
  (``_GRAPHS = False`` launches directly: tests).
* **the window** lives in preallocated buffers of ``window`` tokens (``win_*`` are views of their first
  ``n_window`` tokens): a decode step writes its one token in place instead of concatenating the whole
  window (6 copies of it per layer and step, 3.45 ms of a 70 ms Llama-3-8B step at batch 172: NOTES.md "Exact
  programs, merge and launches (decode)").
  A chunk that does not fit reallocates them; a flush moves the kept tail to the front.

Semantics equal the reference store's (same window/flush policy, same anchors), tested on CPU against it.
:meth:`fill` appends tokens through the same encode path without attending over the coded prefix (chunk
queries see the window and the chunk): what the long-context benchmark uses to fill a store to millions
of tokens without an O(n^2) prefill.

**Pre-RoPE keys** (``key_space="pre_rope"``, a key codebook in the RoPE-pair layout of
:mod:`antkv_compile.numerics.rope_pairs`): decode runs ``antkv::rope_decode_attention`` (the key codes decoded
through a table with the map and mean folded in, each pair rotated by its slot's angle in registers:
``kernels/rope_decode.py``); a flush unrotates the window's keys by their slots before the encode and rotates the
key residual back for the Anchor Scores (``window_flush`` with ``rope_inv_freq``); a long chunk decodes the prefix
and rotates it. The RoPE position of a coded token is its slot, as in the reference store. No decoded copy of the
cache is kept (the reference store's ``coded_path="dequantized"`` shadow is not allocated here).

Not covered (the session falls back to the reference store): the ``dequantized`` read path of post-RoPE codes.
"""
from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import Tensor

from ..config import AnTKVConfig
from ..numerics.attention import exact_attention, merge_partials
from ..numerics.rope import rotate
from ..numerics.store import AnTKVLayerStore, StoreGeometry
from ..numerics.vq import Codebook

__all__ = ["KernelLayerStore", "kernels_support"]

log = logging.getLogger(__name__)

_DECODE_ROWS = 64  # G * T query rows per KV head up to which the decode kernel is used
_DECODE_CHUNK = 8192  # coded tokens decoded at a time for a long chunk's prefix (bounds the float32 transients)
_WINDOW = ("win_k", "win_v", "win_q", "win_out", "win_lse")  # the window's tensors, token axis 2
_GRAPHS = True  # decode launches replayed from a CUDA graph (NOTES.md "Exact programs, merge and launches (decode)")


class _Workspace(dict):
    """Decode scratch buffers (name -> tensor) shared by the stores of one device (one stream)."""


# device -> workspace, held weakly: each store keeps its device's workspace alive, so the scratch goes away
# with the last store instead of staying allocated for the life of the process
_WORKSPACES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _workspace(device: torch.device) -> _Workspace:
    ws = _WORKSPACES.get(str(device))
    if ws is None:
        ws = _WORKSPACES[str(device)] = _Workspace()
    return ws


def kernels_support(config: AnTKVConfig) -> str | None:
    """None when the kernel store can serve ``config``, else the reason it cannot. Pre-RoPE keys are served (their
    key codebook must be in the RoPE-pair layout: checked when the store is built); ``coded_path`` is then how the
    reference store reads them, the kernels decode the codes on the fly either way."""
    if config.key_space == "pre_rope":
        return None
    if config.coded_path != "lut":
        return "coded_path='dequantized'"
    return None


def rope_parameters(rope) -> tuple[Tensor, float]:
    """(inv_freq [D/2] float32, attention_scaling) of a RoPE table (numerics.rope.InvFreqRope, or RopeTable over a
    model's default rotary embedding)."""
    if hasattr(rope, "inv_freq"):
        return rope.inv_freq.detach().float().cpu(), float(rope.attention_scaling)
    rot = getattr(rope, "rotary", None)
    if rot is not None and hasattr(rot, "inv_freq"):
        return rot.inv_freq.detach().float().cpu(), float(getattr(rot, "attention_scaling", 1.0))
    raise ValueError(f"cannot read inv_freq / attention_scaling from {type(rope).__name__}")


def _ops():
    from ..kernels import ops  # noqa: F401  (registers torch.ops.antkv.*)

    return torch.ops.antkv


def _decode_kernels():
    from ..kernels import decode_attention

    return decode_attention


def _flash_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Unmasked attention of q [B, Hq, T, D] over k, v [B, Hkv, n, D] -> (out float32, lse float32)."""
    g = q.shape[1] // k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        kx = k.repeat_interleave(g, dim=1) if g > 1 else k
        vx = v.repeat_interleave(g, dim=1) if g > 1 else v
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, kx, vx, 0.0, False, False, scale=scale)
        return res[0].float(), res[1].float()
    outs, lses = [], []
    for lo in range(0, q.shape[2], 1024):  # bound the [T, n] logits
        o, l_ = exact_attention(q[:, :, lo:lo + 1024], k, v, scale)
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


class KernelLayerStore(AnTKVLayerStore):
    """AnTKV store of one layer whose attention, encode, scoring and selection run as ``antkv::`` ops."""

    window_in_buffers = True  # win_* are views of preallocated buffers (the cache op must not compact them)

    def __init__(self, geometry: StoreGeometry, codebook_k: Codebook, codebook_v: Codebook, config: AnTKVConfig,
                 layer_index: int = 0, centroid_dtype: torch.dtype | None = None, rope=None) -> None:
        reason = kernels_support(config)
        if reason:
            raise ValueError(f"the kernel store does not support {reason}; use AnTKVLayerStore")
        self.pre_rope = config.key_space == "pre_rope"
        base = config
        if config.coded_path != "lut":  # the base class would allocate the reference's decoded shadow: not here
            base = copy.copy(config)
            object.__setattr__(base, "coded_path", "lut")
        super().__init__(geometry, codebook_k, codebook_v, base, layer_index=layer_index, rope=rope)
        self.config = config
        self._layer = layer_index
        g = geometry
        nw = max(1, -(-g.capacity // 32))
        self.anchor_bits = torch.zeros(g.batch, g.num_kv_heads, nw, dtype=torch.int32, device=g.device)
        self.n_coded_t = torch.zeros(g.batch, dtype=torch.int32, device=g.device)
        # centroids read by the decode gathers: 16-bit halves the gather bytes (NOTES.md); fp32 elsewhere
        if centroid_dtype is None:
            centroid_dtype = torch.float16 if g.device.type == "cuda" else torch.float32
        self.cent_k = self.cb_k.centroids.to(centroid_dtype).contiguous()
        self.cent_v = self.cb_v.centroids.to(centroid_dtype).contiguous()
        self.rope_keys: tuple[Tensor, Tensor, Tensor, float] | None = None  # (table, pairs, freq, scaling)
        if self.pre_rope:
            from ..kernels.rope_decode import rope_key_tables

            inv_freq, a = rope_parameters(rope)
            if inv_freq.numel() != g.head_dim // 2:
                raise ValueError(f"the RoPE table has {inv_freq.numel()} frequencies for head_dim {g.head_dim}")
            self.rope_inv_freq = inv_freq.to(g.device)
            table, pairs, freq = rope_key_tables(self.cb_k, inv_freq, centroid_dtype, g.device)
            self.rope_keys = (table, pairs, freq, a)
            self.cent_k = table  # the decode kernel's key table (centroids + mean in coding space)
        self._cb32 = [t.float().contiguous() for t in (self.cb_k.centroids, self.cb_k.transform, self.cb_k.inverse,
                                                       self.cb_k.mean, self.cb_v.centroids, self.cb_v.transform,
                                                       self.cb_v.inverse, self.cb_v.mean)]
        self._slabs: dict[str, Tensor] | None = None  # the window's buffers (see _window_push)
        self._graph: tuple | None = None  # (buffers key, CUDA graph, static query, out, lse, plan): _graph_decode
        self._win_len = torch.zeros(g.batch, dtype=torch.int32, device=g.device)  # window length for the decode
        self._workspace = _workspace(g.device)  # decode scratch shared with the other stores on this device

    # ------------------------------------------------------------------ window buffers
    def _slabs_hold(self, t: int) -> bool:
        """The window tensors are views of the buffers and ``t`` more tokens fit."""
        s, n = self._slabs, self.n_window
        if s is None or n + t > s["win_k"].shape[2]:
            return False
        return all(getattr(self, a) is not None and getattr(self, a).data_ptr() == s[a].data_ptr()
                   and getattr(self, a).shape[2] == n for a in _WINDOW)

    def _reslab(self, like: dict[str, Tensor], t: int) -> None:
        """New buffers of max(window, n_window + t) tokens holding the current window (its tensors may have been
        set directly, e.g. a seeded window). The window's attention outputs are kept in the cache dtype, as the
        capacity planner counts them (a chunk's outputs are fp32: 2x the planned bytes, OOM at the planner's
        largest batch)."""
        n, cap = self.n_window, max(self.window, self.n_window + t)
        if log.isEnabledFor(logging.DEBUG):
            held = {a: (None if getattr(self, a) is None else tuple(getattr(self, a).shape)) for a in _WINDOW}
            log.debug("layer %s: window buffers (re)allocated for %d tokens after %d (capacity %d); window tensors %s, "
                      "buffers %s", self._layer, t, n, cap, held,
                      None if self._slabs is None else {a: tuple(b.shape) for a, b in self._slabs.items()})
        slabs = {}
        for a in _WINDOW:
            cur = getattr(self, a)
            ref = cur if cur is not None else like[a]
            dtype = self.geom.dtype if a == "win_out" else ref.dtype
            buf = ref.new_zeros(ref.shape[:2] + (cap,) + ref.shape[3:], dtype=dtype)  # finite past n_window
            if cur is not None and n:
                buf[:, :, :n].copy_(cur)
            slabs[a] = buf
            setattr(self, a, buf[:, :, :n])
        self._slabs = slabs

    def _window_push(self, kv_written: bool = False, **new: Tensor) -> None:
        """Append ``t`` tokens to the window tensors, in place in the buffers (``kv_written``: _decode already put
        the K/V tokens there)."""
        t = new["win_k"].shape[2]
        if not self._slabs_hold(t):
            self._reslab(new, t)
            kv_written = False
        n = self.n_window
        for a, x in new.items():
            buf = self._slabs[a]
            if not (kv_written and a in ("win_k", "win_v")):
                buf[:, :, n:n + t].copy_(x)
            setattr(self, a, buf[:, :, :n + t])

    def _window_drop(self, n: int) -> None:
        """Drop the oldest ``n`` window tokens: the kept ones move to the front (buffers back to ``window`` tokens
        if a long chunk had grown them)."""
        m = self.n_window - n
        for a in _WINDOW:
            buf = self._slabs[a]
            kept = buf[:, :, n:n + m].clone()
            if buf.shape[2] > self.window:
                buf = self._slabs[a] = buf.new_zeros(buf.shape[:2] + (self.window,) + buf.shape[3:])
            buf[:, :, :m].copy_(kept)
            setattr(self, a, buf[:, :, :m])

    # ------------------------------------------------------------------ attention
    def _decode(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Decode attention; also says whether the new K/V tokens were written into the window buffers."""
        t, n = k.shape[2], self.n_window
        in_place = self._slabs_hold(t)
        if in_place:  # the new tokens written after the window, where _append keeps them
            keys, values = self._slabs["win_k"], self._slabs["win_v"]
            keys[:, :, n:n + t].copy_(k)
            values[:, :, n:n + t].copy_(v)
        else:
            keys, values = torch.cat([self.win_k, k], dim=2), torch.cat([self.win_v, v], dim=2)
        # on CUDA the op's implementation is called directly: this already runs inside the opaque
        # antkv_rt::cache_attend op, and a second trip through the custom-op dispatcher layers cost ~0.2 ms of
        # host time per layer and step (benchmarks/host_overhead.py), which the 32-layer decode step could not hide
        if q.is_cuda and in_place and _GRAPHS and not torch.cuda.is_current_stream_capturing():
            out, lse = self._graph_decode(q, keys, values, n + t)
            return out, lse, in_place
        self._win_len.fill_(n + t)
        args = (q, *self._decode_buffers(keys, values), float(self.geom.scale))
        if self.pre_rope:
            if q.is_cuda:
                from ..kernels.rope_decode import rope_decode_triton

                out, lse = rope_decode_triton(*args, self.rope_keys[3], workspace=self._workspace)
            else:
                out, lse = _ops().rope_decode_attention(*args, self.rope_keys[3])
            return out, lse, in_place
        if q.is_cuda:
            out, lse = _decode_kernels().decode_attention_triton(*args, workspace=self._workspace)
        else:
            out, lse = _ops().decode_attention(*args)
        return out, lse, in_place

    def _graph_decode(self, q: Tensor, keys: Tensor, values: Tensor, win_len: int) -> tuple[Tensor, Tensor]:
        """The decode launches replayed from this store's CUDA graph (captured on first use and whenever one of
        the buffers it reads moved); returns a copy of out and the graph's own lse (read only by _append, which
        copies it into the window in the same step)."""
        static = self._decode_buffers(keys, values)
        key = (tuple(q.shape), q.dtype, tuple(keys.shape), *(x.data_ptr() for x in static))
        self._win_len.fill_(win_len)
        held = self._graph
        if held is not None and held[0] == key:
            _, graph, q_s, out, lse, _ = held
            q_s.copy_(q)
            graph.replay()
            return out.clone(), lse
        self._graph = None  # (frees the old graph before capturing the new one)
        q_s = q.clone()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        if self.pre_rope:  # static = (..., table_k, pairs_k, freq_k, cent_v, inv_v, mean_v): as rope_decode_triton
            pre = list(static)
            pairs, freq = pre[11], pre[12]
            plan = _decode_kernels().DecodePlan(q_s, *pre[:11], None, None, *pre[13:], float(self.geom.scale),
                                                rope_keys=(pairs, freq, self.rope_keys[3]), out=(out, lse),
                                                workspace=self._workspace)
        else:
            plan = _decode_kernels().DecodePlan(q_s, *static, float(self.geom.scale), out=(out, lse),
                                                workspace=self._workspace)
        plan()  # this step's result (a capture runs nothing); also loads the kernels before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan()
        self._graph = (key, graph, q_s, out, lse, plan)
        log.debug("layer %s: decode graph captured for %s", self._layer, tuple(q.shape))
        return out.clone(), lse

    def _decode_buffers(self, keys: Tensor, values: Tensor) -> tuple[Tensor, ...]:
        """The decode op's arguments after the query and before the scale: the store's buffers, the window's
        keys / values and its length tensor."""
        _, _, inv_k, mean_k, _, _, inv_v, mean_v = self._cb32
        if self.pre_rope:  # the key table, pair order and frequencies take the key map's places
            inv_k, mean_k = self.rope_keys[1], self.rope_keys[2]
        return (self.codes_k, self.codes_v, self.anchor_bits, self.n_coded_t, self.anchor_k, self.anchor_v,
                self.anchor_pos, keys, values, self._win_len, self.cent_k, inv_k, mean_k, self.cent_v, inv_v, mean_v)

    def _prefix(self, coded: bool) -> tuple[Tensor, Tensor]:
        """Full-precision view of what precedes a chunk: decoded codes with anchors restored (if ``coded``),
        then the window."""
        ks, vs = [], []
        n = self.n_coded
        if coded and n:
            dt, d = self.geom.dtype, self.geom.head_dim
            # one spare row at n takes the empty anchor slots' writes
            spare = self.codes_k.new_zeros(self.codes_k.shape[:2] + (1, self.codes_k.shape[3]))
            k_hat = self._decode_keys(n + 1, dt)
            v_hat = self.cb_v.decode(torch.cat([self.codes_v[:, :, :n], spare], dim=2)).to(dt)
            if self.anchor_capacity:
                idx = torch.where(self.anchor_pos >= 0, self.anchor_pos, n).long()[..., None].expand(-1, -1, -1, d)
                k_hat.scatter_(2, idx, self.anchor_k)
                v_hat.scatter_(2, idx, self.anchor_v)
            ks.append(k_hat[:, :, :n])
            vs.append(v_hat[:, :, :n])
        ks.append(self.win_k)
        vs.append(self.win_v)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _decode_keys(self, n: int, dtype: torch.dtype) -> Tensor:
        """Post-RoPE keys [B, H, n, D] in ``dtype`` of slots 0 .. n - 1 (slots past n_coded decode code 0), decoded
        (and, pre-RoPE, rotated by their slots) in chunks: the transient float32 buffers stay one chunk large."""
        g = self.geom
        out = torch.empty(g.batch, g.num_kv_heads, n, g.head_dim, dtype=dtype, device=g.device)
        for lo in range(0, n, _DECODE_CHUNK):
            hi = min(n, lo + _DECODE_CHUNK)
            codes = self.codes_k[:, :, lo:min(hi, self.n_coded)]
            if codes.shape[2] < hi - lo:  # the spare slot(s) past the coded tokens
                codes = torch.cat([codes, codes.new_zeros(codes.shape[:2] + (hi - lo - codes.shape[2],
                                                                            codes.shape[3]))], dim=2)
            x = self.cb_k.decode(codes)
            if self.pre_rope:
                x = rotate(x, *self.rope(torch.arange(lo, hi, device=g.device)))
            out[:, :, lo:hi] = x.to(dtype)
        return out

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, coded: bool) -> tuple[Tensor, Tensor]:
        out, lse = _ops().prefill_attention(q, k, v, float(self.geom.scale))
        parts = [(out.float(), lse)]
        pk, pv = self._prefix(coded)
        if pk.shape[2]:
            parts.insert(0, _flash_with_lse(q, pk, pv, float(self.geom.scale)))
        return merge_partials(parts)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, check_finite: bool = True) -> Tensor:
        self._validate(q, k, v, check_finite)
        g = q.shape[1] // k.shape[1]
        kv_written = False
        if g * k.shape[2] <= _DECODE_ROWS:
            out, lse, kv_written = self._decode(q, k, v)
        else:
            out, lse = self._chunk(q, k, v, coded=True)
        self._append(q, k, v, out, lse, kv_written)
        return out.to(q.dtype)

    def fill(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Append T tokens through the real encode path (chunk-local causal attention over the window and
        the chunk, Anchor Scores over those queries, VQ encode, anchor selection) without attending over the
        coded prefix: how a store is brought to a long context quickly. Not a model's attention output."""
        self._validate(q, k, v, False)
        out, lse = self._chunk(q, k, v, coded=False)
        self._append(q, k, v, out, lse)

    # ------------------------------------------------------------------ window and flush
    def _append(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_written: bool = False) -> None:
        self._window_push(kv_written, win_k=k, win_v=v, win_q=q, win_out=out, win_lse=lse)
        if self.n_window >= self.window:
            n = self.n_window - (self.window - self.flush)
            self._flush(n)
            self._window_drop(n)

    def _flush(self, n: int) -> None:
        cent_k, tr_k, inv_k, mean_k, cent_v, tr_v, inv_v, mean_v = self._cb32
        ratio = self.config.anchor_ratio if self.anchor_capacity else 0.0
        _ops().window_flush(
            self.codes_k, self.codes_v, self.anchor_k, self.anchor_v, self.anchor_pos, self.anchor_score,
            self.anchor_bits, self.n_coded_t, self.win_q.contiguous(), self.win_k[:, :, :n].contiguous(),
            self.win_v[:, :, :n].contiguous(), self.win_out.contiguous(), self.win_lse.contiguous(),
            cent_k, tr_k, inv_k, mean_k, cent_v, tr_v, inv_v, mean_v, float(self.geom.scale), float(ratio),
            self.config.score, self.config.row_stride_for(self.win_q.shape[1] // self.geom.num_kv_heads),
            self.config.score_band, *((self.rope_inv_freq, self.rope_keys[3]) if self.pre_rope else ()))
        self.n_coded_t += n
        self.n_coded += n

    @property
    def num_anchors(self) -> int:
        return int((self.anchor_pos[0, 0] >= 0).sum()) if self.anchor_capacity else 0
