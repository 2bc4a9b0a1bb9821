"""The ``antkv`` custom ops: CUDA implementations launch the Triton kernels, CPU runs the PyTorch references.

Registration follows the recipe verified on torch 2.11 (GPU) / 2.13 (CPU) (research notes §0.5, §B3):
``torch.library.custom_op(..., device_types="cuda")`` whose implementation launches Triton directly,
``register_kernel("cpu", reference)`` and ``register_fake``. ``triton_op`` is not used: under
``torch.compile`` on CPU tensors it decomposes into the Triton body and fails; Inductor calls these ops
as opaque extern kernels, which costs nothing inside a CUDA graph. Mutating ops declare every buffer they
write in ``mutates_args``, return nothing, and must never be given a clone of a buffer they mutate as
another argument (pytorch #198031: the compiled graph may pass the buffer itself).

CUDA graphs (``mode="reduce-overhead"``): no op reads a tensor on the host or returns a shape that
depends on data; lengths are int32 tensors read on the device, buffers have fixed capacity.

Importing this module registers the ops; call them as ``torch.ops.antkv.<name>`` (or the Python
functions below, which are the same objects). Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq/Hkv,
query head h reads KV head h // G), D head dim, N code capacity, A anchor capacity, W window capacity,
C = stages * S codes per vector, codebook tensors as in :class:`antkv_compile.numerics.vq.Codebook`
(centroids [stages, H_cb, S, M, sub_dim], transform/inverse [H_cb, D, D], mean [H_cb, D], H_cb = Hkv or 1).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import anchors as _anchors
from . import decode_attention as _decode
from . import prefill_attention as _prefill
from . import rope_decode as _rope
from . import vq_encode as _vq


def _c(*ts: Tensor):
    out = tuple(t.contiguous() for t in ts)
    return out if len(out) > 1 else out[0]


# ------------------------------------------------------------------------------------------------- vq_encode
@custom_op("antkv::vq_encode", mutates_args=(), device_types="cuda")
def vq_encode(x: Tensor, centroids: Tensor, transform: Tensor, inverse: Tensor, mean: Tensor
              ) -> tuple[Tensor, Tensor]:
    """Nearest-centroid codes of x and its reconstruction error.

    x [B, H, T, D] (any float dtype); codebook tensors of keys or values (fp32 recommended).
    Returns codes uint8 [B, H, T, stages*S] and residual float32 [B, H, T, D] = decode(codes) - x
    (the dk / dv the Anchor Score needs). Functional.
    """
    return _c(*_vq.vq_encode_triton(x, centroids, transform, inverse, mean))


@vq_encode.register_kernel("cpu")
def _vq_encode_cpu(x, centroids, transform, inverse, mean):
    return _c(*_vq.vq_encode_reference(x, centroids, transform, inverse, mean))


@vq_encode.register_fake
def _vq_encode_fake(x, centroids, transform, inverse, mean):
    b, h, t, d = x.shape
    codes = x.new_empty((b, h, t, centroids.shape[0] * centroids.shape[2]), dtype=torch.uint8)
    return codes, x.new_empty((b, h, t, d), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- prefill
@custom_op("antkv::prefill_attention", mutates_args=(), device_types="cuda")
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal GQA attention of T queries over the same T keys (FlashAttention tiling).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] -> out [B, Hq, T, D] (q.dtype), lse [B, Hq, T] float32 (natural log).
    """
    return _c(*_prefill.prefill_attention_triton(q, k, v, scale))


@prefill_attention.register_kernel("cpu")
def _prefill_attention_cpu(q, k, v, scale):
    return _c(*_prefill.prefill_attention_reference(q, k, v, scale))


@prefill_attention.register_fake
def _prefill_attention_fake(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@custom_op("antkv::anchor_scores", mutates_args=(), device_types="cuda")
def anchor_scores(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, out: Tensor, lse: Tensor,
                  scale: float, row_stride: int = 1, band: int = 256) -> Tensor:
    """Anchor Score ("ans") of each of Tk key tokens over the Tq >= Tk queries aligned with them (query i
    reads keys j <= i: a window flush scores its oldest Tk tokens over all of the window's queries),
    summed over the G query heads of its KV head.

    q/out [B, Hq, Tq, D], lse [B, Hq, Tq] (the rows' *final* output and log-normalizer), k/v [B, Hkv, Tk, D],
    dk/dv [B, Hkv, Tk, D] = quantized - exact. Returns [B, Hkv, Tk] float32. ``row_stride`` > 1 samples the
    rows more than ``band`` past a key (AnTKVConfig.score_row_stride).
    """
    return _prefill.anchor_scores_triton(q, k, v, dk, dv, out, lse, scale, row_stride=row_stride, band=band)


@anchor_scores.register_kernel("cpu")
def _anchor_scores_cpu(q, k, v, dk, dv, out, lse, scale, row_stride=1, band=256):
    return _c(_prefill.anchor_scores_reference(q, k, v, dk, dv, out, lse, scale, row_stride, band))


@anchor_scores.register_fake
def _anchor_scores_fake(q, k, v, dk, dv, out, lse, scale, row_stride=1, band=256):
    return k.new_empty(k.shape[:3], dtype=torch.float32)


@custom_op("antkv::prefill_attention_ans", mutates_args=(), device_types="cuda")
def prefill_attention_ans(q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, scale: float,
                          row_stride: int = 1, band: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """prefill_attention + anchor_scores in one call: (out q.dtype, lse float32 [B, Hq, T], scores float32
    [B, Hkv, T]). CUDA: forward kernel + key-block-stationary score kernel (the faster schedule measured)."""
    return _c(*_prefill.prefill_attention_ans_triton(q, k, v, dk, dv, scale, row_stride=row_stride, band=band))


@prefill_attention_ans.register_kernel("cpu")
def _prefill_attention_ans_cpu(q, k, v, dk, dv, scale, row_stride=1, band=256):
    return _c(*_prefill.prefill_attention_ans_reference(q, k, v, dk, dv, scale, row_stride, band))


@prefill_attention_ans.register_fake
def _prefill_attention_ans_fake(q, k, v, dk, dv, scale, row_stride=1, band=256):
    return (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32),
            k.new_empty(k.shape[:3], dtype=torch.float32))


# ------------------------------------------------------------------------------------------------- decode
@custom_op("antkv::decode_attention", mutates_args=(), device_types="cuda")
def decode_attention(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    cent_k: Tensor, inv_k: Tensor, mean_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of the new queries over the whole AnTKV store of one layer.

    q [B, Hq, Tq, D] (G*Tq <= 128); codes_k/v uint8 [B, Hkv, N, C]; anchor_bits int32 [B, Hkv, ceil(N/32)]
    (bit n%32 of word n//32 = token n is an anchor); n_coded int32 [B]; anchor_k/v [B, Hkv, A, D] with
    anchor_pos int32 [B, Hkv, A] (-1 = empty slot); win_k/v [B, Hkv, W, D] = the full-precision window that
    already holds the Tq new tokens, win_len int32 [B] valid entries (query t sees window entries
    j <= win_len[b] - Tq + t); cent_*/inv_*/mean_* the key and value codebooks (centroids may be stored in
    fp16/bf16 to halve the gather bytes). Returns out [B, Hq, Tq, D] in q.dtype and lse [B, Hq, Tq]
    float32 (natural log; -inf if a row saw nothing). No host sync, fixed shapes: CUDA-graph safe.
    """
    return _decode.decode_attention_triton(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v,
                                           anchor_pos, win_k, win_v, win_len, cent_k, inv_k, mean_k, cent_v,
                                           inv_v, mean_v, scale)


@decode_attention.register_kernel("cpu")
def _decode_attention_cpu(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k, win_v,
                          win_len, cent_k, inv_k, mean_k, cent_v, inv_v, mean_v, scale):
    return _c(*_decode.decode_attention_reference(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v,
                                                  anchor_pos, win_k, win_v, win_len, cent_k, inv_k, mean_k,
                                                  cent_v, inv_v, mean_v, scale))


@decode_attention.register_fake
def _decode_attention_fake(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k,
                           win_v, win_len, cent_k, inv_k, mean_k, cent_v, inv_v, mean_v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@custom_op("antkv::rope_decode_attention", mutates_args=(), device_types="cuda")
def rope_decode_attention(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, win_k: Tensor, win_v: Tensor, win_len: Tensor,
    table_k: Tensor, pairs_k: Tensor, freq_k: Tensor, cent_v: Tensor, inv_v: Tensor, mean_v: Tensor, scale: float,
    rope_scale: float,
) -> tuple[Tensor, Tensor]:
    """decode_attention for pre-RoPE keys coded in RoPE-pair sub-spaces (kernels/rope_decode.py): the key codes
    are decoded through table_k [stages, H_cb, S, M, sd] (centroids + mean in coding space), each pair rotated by its
    slot's angle fp32(slot * freq_k) times rope_scale (attention_scaling), pairs_k [H_cb, D/2] int32 the model pair of
    each coding pair, freq_k [H_cb, D/2] float32 its frequency. Everything else as decode_attention.
    """
    return _rope.rope_decode_triton(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k,
                                    win_v, win_len, table_k, pairs_k, freq_k, cent_v, inv_v, mean_v, scale, rope_scale)


@rope_decode_attention.register_kernel("cpu")
def _rope_decode_attention_cpu(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos, win_k,
                               win_v, win_len, table_k, pairs_k, freq_k, cent_v, inv_v, mean_v, scale, rope_scale):
    return _c(*_rope.rope_decode_reference(q, codes_k, codes_v, anchor_bits, n_coded, anchor_k, anchor_v, anchor_pos,
                                           win_k, win_v, win_len, table_k, pairs_k, freq_k, cent_v, inv_v, mean_v,
                                           scale, rope_scale))


@rope_decode_attention.register_fake
def _rope_decode_attention_fake(q, *args):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- mutating
_ANCHOR_BUFFERS = ("anchor_k", "anchor_v", "anchor_pos", "anchor_score", "anchor_bits")


@custom_op("antkv::select_anchors", mutates_args=_ANCHOR_BUFFERS)
def select_anchors(anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, anchor_score: Tensor,
                   anchor_bits: Tensor, scores: Tensor, k: Tensor, v: Tensor, n_coded: Tensor,
                   anchor_ratio: float) -> None:
    """Merge W scored new tokens into the anchor set, in place (every device; torch.topk over A + W).

    anchor_k/v [B, Hkv, A, D], anchor_pos int32 [B, Hkv, A], anchor_score float32 [B, Hkv, A] (-inf empty),
    anchor_bits int32 [B, Hkv, ceil(N/32)]; scores float32 [B, Hkv, W] of the new tokens k/v [B, Hkv, W, D]
    at positions n_coded[b] + t. Keeps the best min(n, ceil(anchor_ratio * n)) (n = n_coded[b] + W) of old
    and new, sorted by score; empty slots get pos -1 / score -inf; the bitmask is rebuilt.
    """
    _anchors.select_anchors_(anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, scores, k, v, n_coded,
                             anchor_ratio)


@select_anchors.register_fake
def _select_anchors_fake(anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, scores, k, v, n_coded,
                         anchor_ratio):
    return None


_FLUSH_BUFFERS = ("codes_k", "codes_v", *_ANCHOR_BUFFERS)


@custom_op("antkv::window_flush", mutates_args=_FLUSH_BUFFERS, device_types="cuda")
def window_flush(
    codes_k: Tensor, codes_v: Tensor, anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, anchor_score: Tensor,
    anchor_bits: Tensor, n_coded: Tensor, win_q: Tensor, win_k: Tensor, win_v: Tensor, win_out: Tensor,
    win_lse: Tensor, cent_k: Tensor, tr_k: Tensor, inv_k: Tensor, mean_k: Tensor, cent_v: Tensor, tr_v: Tensor,
    inv_v: Tensor, mean_v: Tensor, scale: float, anchor_ratio: float, score_kind: str, row_stride: int = 1,
    band: int = 256, rope_inv_freq: Tensor | None = None, rope_scale: float = 1.0,
) -> None:
    """Flush the oldest W window tokens into the store (what AnTKVLayerStore._flush(W) does), in place.

    win_k/v [B, Hkv, W, D] the tokens to flush (the window's oldest W), win_q [B, Hq, Wq, D] all Wq >= W
    queries the window holds (query i arrived with window token i), win_out [B, Hq, Wq, D] / win_lse
    [B, Hq, Wq] those queries' final attention output and log-normalizer (as returned by
    decode_attention / prefill_attention). Encodes the window, writes its codes at
    n_coded[b] + t, scores it (score_kind "ans" on Triton; "sensitivity", "attention" by the reference;
    "random"; "none"; query rows more than ``band`` past a token read every ``row_stride``-th only, see
    AnTKVConfig.score_row_stride), and merges the newcomers into the anchors (see select_anchors). Does NOT
    advance n_coded: the caller adds W afterwards (and empties its window).

    rope_inv_freq [D/2] (pre-RoPE key codebooks): the window's keys are post-RoPE; each is unrotated by its slot
    n_coded[b] + t (cos/sin of fp32(slot * inv_freq) times rope_scale, as the model) before it is encoded, and its
    quantization residual rotated back for the Anchor Score (the scores and the anchors see post-RoPE keys).
    """
    _anchors.window_flush_(codes_k, codes_v, anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, n_coded,
                           win_q, win_k, win_v, win_out, win_lse, cent_k, tr_k, inv_k, mean_k, cent_v, tr_v, inv_v,
                           mean_v, scale, anchor_ratio, score_kind, row_stride, band, use_triton=True,
                           rope_inv_freq=rope_inv_freq, rope_scale=rope_scale)


@window_flush.register_kernel("cpu")
def _window_flush_cpu(codes_k, codes_v, anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, n_coded, win_q,
                      win_k, win_v, win_out, win_lse, cent_k, tr_k, inv_k, mean_k, cent_v, tr_v, inv_v, mean_v, scale,
                      anchor_ratio, score_kind, row_stride=1, band=256, rope_inv_freq=None, rope_scale=1.0):
    _anchors.window_flush_(codes_k, codes_v, anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, n_coded,
                           win_q, win_k, win_v, win_out, win_lse, cent_k, tr_k, inv_k, mean_k, cent_v, tr_v, inv_v,
                           mean_v, scale, anchor_ratio, score_kind, row_stride, band, use_triton=False,
                           rope_inv_freq=rope_inv_freq, rope_scale=rope_scale)


@window_flush.register_fake
def _window_flush_fake(*args):
    return None


OPS = {
    "vq_encode": vq_encode,
    "prefill_attention": prefill_attention,
    "anchor_scores": anchor_scores,
    "prefill_attention_ans": prefill_attention_ans,
    "decode_attention": decode_attention,
    "rope_decode_attention": rope_decode_attention,
    "select_anchors": select_anchors,
    "window_flush": window_flush,
}


# ------------------------------------------------------------------------------------------------- dense decode
from . import dense_decode as _dense  # noqa: E402


@custom_op("antkv::dense_decode_attention", mutates_args=(), device_types="cuda")
def dense_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float
                           ) -> tuple[Tensor, Tensor]:
    """Full-precision decode attention over a dense static KV cache (the FP16/BF16 baseline): split-K flash
    decoding that reads each valid cache byte once (no grouped-query expansion).

    q [B, Hq, Tq, D] (G*Tq <= 64, G = Hq/Hkv; query head h reads KV head h // G); k_cache/v_cache
    [B, Hkv, L, D] fp16/bf16 (fp32 accepted) that already hold the Tq new tokens; lengths int32 [B] valid
    positions (clamped to [0, L]): query t of sequence b sees keys j <= lengths[b] - Tq + t. Returns out
    [B, Hq, Tq, D] in q.dtype and lse [B, Hq, Tq] float32 (natural log; -inf and out 0 for a row that sees
    nothing). No host sync, fixed shapes: CUDA-graph safe.
    """
    return _c(*_dense.dense_decode_triton(q, k_cache, v_cache, lengths, scale))


@dense_decode_attention.register_kernel("cpu")
def _dense_decode_attention_cpu(q, k_cache, v_cache, lengths, scale):
    return _c(*_dense.dense_decode_reference(q, k_cache, v_cache, lengths, scale))


@dense_decode_attention.register_fake
def _dense_decode_attention_fake(q, k_cache, v_cache, lengths, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


OPS["dense_decode_attention"] = dense_decode_attention
