"""Dense decode baseline on the GPU: correctness at Llama-3-8B attention shapes, achieved bandwidth, a small
config sweep, and the attention function inside ``generate`` (static cache, eager and auto-compiled).

    python benchmarks/dense_decode_bench.py [--quick] [--out results.json]

Timings are CUDA-graph replays of ``n_layers`` calls on distinct caches (like the layers of one step, so the
50 MB L2 does not hold the cache between calls); bandwidth counts the bytes of the valid K and V
(2 * B * Hkv * len * D * 2). "sdpa_flash" is torch SDPA (enable_gqa, no mask, keys exactly len), the ideal
stock kernel; HF's compiled sdpa decode on a static cache is slower (mask + repeat_kv over the capacity).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from antkv_compile.kernels import dense_decode as DD
from antkv_compile.kernels import ops  # noqa: F401

HQ, HKV, D = 32, 8, 128


def graph_time(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters * 1e3  # us per replay


def make_layers(b, ctx, tq, dtype, budget=24e9):
    per = 2 * b * HKV * ctx * D * 2
    nl = int(max(1, min(8, math.ceil(400e6 / per), budget // per)))
    q = torch.randn(b, HQ, tq, D, device="cuda", dtype=dtype)
    caches = [(torch.randn(b, HKV, ctx, D, device="cuda", dtype=dtype),
               torch.randn(b, HKV, ctx, D, device="cuda", dtype=dtype)) for _ in range(nl)]
    lengths = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    return q, caches, lengths, per


def time_dense(q, caches, lengths, **opt):
    def fn():
        for k, v in caches:
            DD.dense_decode_triton(q, k, v, lengths, D ** -0.5, **opt)
    return graph_time(fn) / len(caches)


def time_sdpa(q, caches):
    def fn():
        for k, v in caches:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return graph_time(fn) / len(caches)


def correctness(res):
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for tq in (1, 4, 16):
            b, cap = 2, 32768
            q = torch.randn(b, HQ, tq, D, device="cuda", dtype=dtype)
            k = torch.randn(b, HKV, cap, D, device="cuda", dtype=dtype)
            v = torch.randn(b, HKV, cap, D, device="cuda", dtype=dtype)
            lengths = torch.tensor([cap, 20001], dtype=torch.int32, device="cuda")
            ro, rl = DD.dense_decode_reference(q, k, v, lengths, D ** -0.5)
            for splits in (None, 1):
                o, l = DD.dense_decode_triton(q, k, v, lengths, D ** -0.5, splits=splits, poison=True)
                err = float((o.float() - ro.float()).norm() / ro.float().norm())
                lerr = float((l - rl).abs().max())
                rows.append(dict(dtype=str(dtype), tq=tq, splits=splits, out_rel=err, lse_abs=lerr,
                                 nan=bool(o.isnan().any() or l.isnan().any())))
            # the op, replayed in a CUDA graph after the cache changed under it
            g = torch.cuda.CUDAGraph()
            torch.ops.antkv.dense_decode_attention(q, k, v, lengths, D ** -0.5)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                go, gl = torch.ops.antkv.dense_decode_attention(q, k, v, lengths, D ** -0.5)
            k.mul_(0.5)
            lengths.copy_(torch.tensor([1000, 32768], dtype=torch.int32))
            g.replay()
            ro2, _ = DD.dense_decode_reference(q, k, v, lengths, D ** -0.5)
            rows[-1]["graph_rel"] = float((go.float() - ro2.float()).norm() / ro2.float().norm())
    for r in rows:
        print("correct", r)
    res["correctness"] = rows
    kern = DD.LAST_LAUNCH.get("dense_decode")
    try:
        res["split_kernel_regs"] = (int(kern.n_regs), int(kern.n_spills))
        print("split kernel registers / spills", res["split_kernel_regs"])
    except Exception as exc:  # noqa: BLE001
        print("no register info", exc)


def perf(res, quick):
    rows = []
    shapes = [(1, 8192), (1, 32768), (1, 131072), (2, 32768), (4, 32768), (8, 32768), (8, 131072), (16, 32768),
              (32, 32768), (32, 131072), (64, 32768), (64, 131072)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, ctx in shapes:
        q, caches, lengths, per = make_layers(b, ctx, 1, torch.bfloat16)
        p = DD.default_splits(b, HKV, ctx, sms)
        t = time_dense(q, caches, lengths)
        kern = DD.LAST_LAUNCH.get("dense_decode")
        regs = (getattr(kern, "n_regs", None), getattr(kern, "n_spills", None))
        ts = time_sdpa(q, caches)
        row = dict(b=b, ctx=ctx, splits=p, stages=DD.default_stages(b * HKV * p, sms), regs=regs, dense_us=t, dense_gbs=per / t / 1e3, sdpa_us=ts, sdpa_gbs=per / ts / 1e3)
        print("perf", row, flush=True)
        rows.append(row)
        del q, caches
        torch.cuda.empty_cache()
    res["perf"] = rows
    if quick:
        return
    sweep = []
    for b, ctx in [(1, 32768), (1, 131072), (8, 32768), (64, 32768)]:
        q, caches, lengths, per = make_layers(b, ctx, 1, torch.bfloat16)
        best = None
        for block_n in (64, 128):
            for stages in (2, 3, 4):
                for warps in (4, 8):
                    try:
                        t = time_dense(q, caches, lengths, block_n=block_n, num_stages=stages, num_warps=warps)
                    except Exception as exc:  # noqa: BLE001  (shared memory overflow etc.)
                        print("fail", b, ctx, block_n, stages, warps, type(exc).__name__)
                        continue
                    r = dict(b=b, ctx=ctx, block_n=block_n, stages=stages, warps=warps, mult=1.0, us=t,
                             gbs=per / t / 1e3)
                    sweep.append(r)
                    if best is None or t < best["us"]:
                        best = r
        for mult in (0.25, 0.5, 2.0, 4.0):
            t = time_dense(q, caches, lengths, block_n=best["block_n"], num_stages=best["stages"],
                           num_warps=best["warps"], split_mult=mult)
            sweep.append(dict(best, mult=mult, us=t, gbs=per / t / 1e3))
        for r in sweep:
            if r["b"] == b and r["ctx"] == ctx:
                print("sweep", r)
        del q, caches
        torch.cuda.empty_cache()
    res["sweep"] = sweep


def split_sweep(res):
    """Time per split-count multiplier (target programs = 8 * SMs * mult) over batch and context."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for ctx in (8192, 32768, 131072):
        for b in (1, 2, 4, 8, 16, 32, 64):
            if b * ctx > 64 * 65536:
                continue
            q, caches, lengths, per = make_layers(b, ctx, 1, torch.bfloat16)
            row = dict(b=b, ctx=ctx, sdpa_us=time_sdpa(q, caches))
            for mult in (0.125, 0.25, 0.375, 0.5, 1.0):
                for block_n, stages in ((64, 2), (64, 3), (128, 2)):
                    p = DD.default_splits(b, HKV, ctx, sms, block_n, mult)
                    t = time_dense(q, caches, lengths, split_mult=mult, block_n=block_n, num_stages=stages)
                    row[f"{mult}/{block_n}/{stages}"] = (p, round(t, 1))
            best = min((v[1], k) for k, v in row.items() if "/" in k)
            row["best"] = best
            row["best_gbs"] = per / best[0] / 1e3
            print("splits", row, flush=True)
            rows.append(row)
            del q, caches
            torch.cuda.empty_cache()
    res["split_sweep"] = rows


def model_level(res):
    from transformers.generation.configuration_utils import CompileConfig

    from antkv_compile import baselines
    from antkv_compile.models import tiny_model

    seen = {}
    orig = baselines.dense_decode_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.setdefault(query.shape[2], sorted(kw))
        return orig(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface
    AttentionInterface.register("antkv_dense_spy", spy)
    from transformers.masking_utils import AttentionMaskInterface
    AttentionMaskInterface.register("antkv_dense_spy", AttentionMaskInterface._global_mapping["sdpa"])
    out = {}
    model = tiny_model("llama").cuda()
    ids = torch.randint(4, 100, (2, 40), device="cuda")
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    ref = model.generate(ids, disable_compile=True, **kw)
    model.set_attn_implementation("antkv_dense_spy")
    eager = model.generate(ids, disable_compile=True, **kw)
    print("kwargs seen by the attention function", seen)
    model.set_attn_implementation(baselines.NAME)
    comp = model.generate(ids, **kw)  # auto compile of the decode step (mode reduce-overhead on CUDA)
    comp2 = model.generate(ids, **kw)
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    comp3 = model.generate(ids, compile_config=cc, **kw)

    def diff(a):
        return max(float((x - y).abs().max()) for x, y in zip(a.logits, ref.logits))

    for name, r in (("eager", eager), ("compiled_ro", comp), ("compiled_ro_2", comp2), ("compiled_default", comp3)):
        out[name] = dict(tokens_equal=bool(torch.equal(r.sequences, ref.sequences)), max_logit_diff=diff(r))
    out["kwargs"] = {str(k): v for k, v in seen.items()}
    print("model", out)
    res["model"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    import transformers
    import triton
    res.update(triton=triton.__version__, transformers=transformers.__version__)
    print(res)
    t0 = time.time()
    for name, fn in (("correctness", correctness), ("model", model_level)):
        if name not in a.skip:
            try:
                fn(res)
            except Exception as exc:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                res[name + "_error"] = repr(exc)
        print(f"[{name} done at {time.time() - t0:.0f}s]", flush=True)
    if "splits" in a.only:
        split_sweep(res)
    elif "perf" not in a.skip:
        perf(res, a.quick)
    print(f"[done at {time.time() - t0:.0f}s]")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
