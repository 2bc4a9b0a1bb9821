"""The decode check: one step's attention output against an fp32 reference on a slice of the store."""
from __future__ import annotations


import torch


def _head_codebook(cb, h: int):
    from ..numerics.vq import Codebook

    if cb.num_heads == 1:
        return cb
    return Codebook(cb.centroids[:, h:h + 1], cb.transform[h:h + 1], cb.inverse[h:h + 1], cb.mean[h:h + 1])


def reference_slice(store, q, k, v, batch: int = 0, kv_head: int = 0, block: int = 1 << 18):
    """fp32 reference of what ``store.attend(q, k, v)`` returns for sequence ``batch`` and the query heads of
    KV head ``kv_head`` ([1, G, T, D]), from the store's contents *before* the call, without mutating it:
    coded tokens decoded from their codes (anchors excluded), the anchors and the window plus the new tokens
    exact (causal), merged by log-sum-exp. The coded part is processed in blocks of ``block`` tokens, so a
    multi-million-token store needs a few hundred MB. Post-RoPE key codes only."""
    from ..numerics.attention import causal_mask, exact_attention, merge_partials

    hkv = store.geom.num_kv_heads
    g = q.shape[1] // hkv
    t = q.shape[2]
    scale = store.geom.scale
    b, h = batch, kv_head
    qs = q[b:b + 1, h * g:(h + 1) * g]
    parts = []
    n = int(store.n_coded)
    if n:
        cbk, cbv = _head_codebook(store.cb_k, h), _head_codebook(store.cb_v, h)
        is_anchor = torch.zeros(n, dtype=torch.bool, device=q.device)
        if getattr(store, "anchor_capacity", 0):
            pos = store.anchor_pos[b, h]
            valid = pos >= 0
            if bool(valid.any()):
                is_anchor[pos[valid].long()] = True
                ak = store.anchor_k[b:b + 1, h:h + 1][:, :, valid]
                av = store.anchor_v[b:b + 1, h:h + 1][:, :, valid]
                parts.append(exact_attention(qs, ak, av, scale))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            kh = cbk.decode(store.codes_k[b:b + 1, h:h + 1, lo:hi])
            vh = cbv.decode(store.codes_v[b:b + 1, h:h + 1, lo:hi])
            vis = ~is_anchor[lo:hi]
            parts.append(exact_attention(qs, kh, vh, scale, vis[None, None, None, :]))
            del kh, vh
    wk = torch.cat([store.win_k[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1]], dim=2)
    wv = torch.cat([store.win_v[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1]], dim=2)
    n_total = len(store)
    q_pos = torch.arange(n_total, n_total + t, device=q.device)
    k_pos = torch.arange(n, n_total + t, device=q.device)
    parts.append(exact_attention(qs, wk, wv, scale, causal_mask(q_pos, k_pos)))
    out, _ = merge_partials(parts)
    return out


class DecodeChecker:
    """Wraps ``attend`` of the chosen layers' stores (instance attribute) for one compiled step: computes
    :func:`reference_slice` before the real call and compares the slice of the real output with it."""

    def __init__(self, stores: dict, layers, batch: int = 0, kv_head: int = 0):
        self.stores = {l: stores[l] for l in layers if l in stores}
        self.batch, self.kv_head = batch, kv_head
        self.results: dict[int, dict] = {}

    def __enter__(self):
        for layer, store in self.stores.items():
            orig = store.attend

            def wrapped(q, k, v, *a, _orig=orig, _layer=layer, _store=store, **kw):
                ref = None
                try:
                    if getattr(getattr(_store, "config", None), "key_space", "post_rope") == "post_rope":
                        ref = reference_slice(_store, q, k, v, self.batch, self.kv_head)
                except Exception as exc:  # noqa: BLE001 - report, do not break the step
                    self.results[_layer] = {"error": f"reference failed: {exc!r}"[:300]}
                out = _orig(q, k, v, *a, **kw)
                if ref is not None:
                    g = q.shape[1] // k.shape[1]
                    got = out[self.batch:self.batch + 1, self.kv_head * g:(self.kv_head + 1) * g].float()
                    err = (got - ref).norm() / ref.norm().clamp_min(1e-30)
                    self.results[_layer] = {"rel_err": float(err), "max_abs_err": float((got - ref).abs().max()),
                                            "ref_norm": float(ref.norm()), "position": len(_store) - k.shape[2],
                                            "finite": bool(torch.isfinite(got).all())}
                return out

            store.attend = wrapped
        return self

    def __exit__(self, *exc):
        for store in self.stores.values():
            store.__dict__.pop("attend", None)
        return False
