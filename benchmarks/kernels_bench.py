"""GPU benchmark of the antkv Triton kernels: correctness against the references, then timings against
FP16 SDPA (flash) at the Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128).

    python benchmarks/kernels_bench.py                # on the GPU machine; writes JSON + PNG to $OUT or --out
    python benchmarks/kernels_bench.py --quick        # smaller sweep
    python benchmarks/kernels_bench.py --out benchmarks/results

Timings: triton.testing.do_bench medians (it clears L2 before every repetition, so small inputs are not
timed from cache), warm-up first, random data (never zeros). Decode is timed as CUDA-graph replays for
both sides (ours: the prologue (+ key table) and the split kernel, which merges; SDPA: one flash call). Bandwidth:
bytes the kernels must move (reads + writes, each once) over time, against a measured device-to-device
copy (bytes read + written). The table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--dry" in sys.argv:  # must precede the first import of a kernel module
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ROOT)

from antkv_compile.config import get_preset  # noqa: E402
from antkv_compile.kernels import anchors as AN  # noqa: E402
from antkv_compile.kernels import decode_attention as DA  # noqa: E402
from antkv_compile.kernels import ops  # noqa: E402,F401  (registers torch.ops.antkv.*)
from antkv_compile.kernels import prefill_attention as PA  # noqa: E402
from antkv_compile.kernels import vq_encode as VQ  # noqa: E402
from antkv_compile.numerics.vq import Codebook  # noqa: E402

HQ, HKV, D = 32, 8, 128
DEV = "cuda"
DRY = False  # --dry: CPU + Triton interpreter, tiny shapes, wall-clock "timings" (checks the script, not the GPU)
RESULTS: dict = {"sections": {}, "errors": {}}
LOG: list[str] = []
PARTIAL = ""  # JSON rewritten after every section (survives a time-out)


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def section(name):
    def deco(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                r = fn(*a, **k)
                RESULTS["sections"][name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
                if PARTIAL:
                    with open(PARTIAL, "w") as f:
                        json.dump(RESULTS, f, indent=1, default=str)
                return r
            except Exception as exc:  # noqa: BLE001 - keep going, report
                tb = traceback.format_exc()
                log(f"!! section {name} failed: {exc}\n{tb}")
                RESULTS["errors"][name] = tb[-3000:]
                RESULTS["sections"][name] = {"ok": False, "seconds": round(time.time() - t0, 1)}
                empty_cache()
                return None
        return run
    return deco


def empty_cache():
    if not DRY:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench(fn, ms=200, warm=50):
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=warm, rep=ms, return_mode="median")


def graph_of(fn):
    """Capture fn (after a warm-up call on a side stream) in a CUDA graph; return its replay."""
    if DRY:
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay




def _sdpa_decode_ms(b, ctx, rep_ms, flash=True) -> float:
    """FP16 SDPA decode (one query token, GQA) over ``ctx`` random keys at batch ``b``: ms per CUDA-graph replay;
    FlashAttention unless ``flash`` is False (the interpreter dry run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.float16)
    k = torch.randn(b, HKV, ctx, D, device=DEV, dtype=torch.float16)
    v = torch.randn(b, HKV, ctx, D, device=DEV, dtype=torch.float16)

    def sdpa():
        if not flash:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return bench(graph_of(sdpa), ms=rep_ms, warm=25)


def _correctness(o, lse, o_split, ref_o, ref_l, replay=None) -> dict:
    """Relative errors of a decode variant against the reference; with ``replay`` (the variant as a callable) also
    the output of the second replay of its CUDA graph (counters must be reset by every call)."""
    rec = {"out": rel(o, ref_o), "lse": rel(lse, ref_l), "out_splits": rel(o_split, ref_o),
           "nan": bool(o.isnan().any() or lse.isnan().any() or o_split.isnan().any())}
    if replay is not None:
        held = {}
        rp = graph_of(lambda: held.__setitem__("o", replay()[0]))
        held["o"].fill_(float("nan"))
        rp()
        rp()
        torch.cuda.synchronize()
        rec["graph"] = rel(held["o"], ref_o)
        rec["nan"] = rec["nan"] or bool(held["o"].isnan().any())
    return rec

def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ inputs
def make_codebooks(bits, heads=None, d=None, seed=0, cent_dtype=torch.float16):
    heads, d = heads or HKV, d or D
    p = get_preset(bits)
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = d // p.sub_dim
    out = []
    for i in range(2):
        cent = torch.randn(p.stages, heads, s, p.num_centroids, p.sub_dim, generator=g)
        a = torch.randn(heads, d, d, generator=g) / d**0.5 + 2 * torch.eye(d)
        inv = torch.linalg.inv(a)
        mean = 0.1 * torch.randn(heads, d, generator=g)
        out.append(Codebook(cent.to(cent_dtype).float(), a, inv, mean).to(DEV))
    return out


def decode_inputs(bits, batch, ctx, dtype, seed=0, window=64, win_len=32, ratio=0.01, cent_dtype=None):
    """Store buffers of `batch` sequences with ctx tokens each: ctx - (win_len - 1) coded (1% anchors),
    win_len - 1 older window tokens + the new one."""
    dev = DEV
    torch.manual_seed(seed)
    cbk, cbv = make_codebooks(bits, seed=seed, cent_dtype=cent_dtype or dtype)
    n_coded = ctx - (win_len - 1)
    cap = ctx
    m = cbk.num_centroids
    ck = torch.randint(0, m, (batch, HKV, cap, cbk.codes_per_vector), dtype=torch.uint8, device=dev)
    cv = torch.randint(0, m, (batch, HKV, cap, cbv.codes_per_vector), dtype=torch.uint8, device=dev)
    a = math.ceil(ratio * cap)
    stride = max(1, n_coded // a)
    pos = (torch.arange(a, device=dev) * stride)[None, None, :] + torch.randint(0, stride, (batch, HKV, a), device=dev)
    pos = pos.clamp(max=n_coded - 1).to(torch.int32)
    ak = torch.randn(batch, HKV, a, D, device=dev, dtype=dtype)
    av = torch.randn(batch, HKV, a, D, device=dev, dtype=dtype)
    wk = torch.randn(batch, HKV, window, D, device=dev, dtype=dtype)
    wv = torch.randn(batch, HKV, window, D, device=dev, dtype=dtype)
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=dtype)
    full = lambda x: torch.full((batch,), x, dtype=torch.int32, device=dev)  # noqa: E731
    bits_ = DA.bits_from_positions(pos, cap)
    cast = cent_dtype or dtype
    return [q, ck, cv, bits_, full(n_coded), ak, av, pos, wk, wv, full(win_len),
            cbk.centroids.to(cast), cbk.inverse, cbk.mean, cbv.centroids.to(cast), cbv.inverse, cbv.mean, D**-0.5]


def decode_bytes(args, p_total):
    q, ck, cv, bits, ncod, ak, av, pos, wk, wv, wl = args[:11]
    b = q.shape[0]
    n = int(ncod[0])
    e = q.element_size()
    codes = b * HKV * n * (ck.shape[3] + cv.shape[3])
    bitmask = b * HKV * math.ceil(n / 32) * 4
    anchors = b * HKV * ak.shape[2] * (2 * D * e + 4)
    window = b * HKV * int(wl[0]) * 2 * D * e
    qo = 2 * b * HQ * D * e
    books = HKV * (args[11][0, 0].numel() + args[14][0, 0].numel()) * args[11].element_size() + 2 * HKV * D * D * 4
    partials = 2 * b * HKV * p_total * 16 * (D + 1) * 4
    return {"codes": codes, "bitmask": bitmask, "anchors": anchors, "window": window, "q_out": qo, "codebooks": books,
            "partials": partials, "total": codes + bitmask + anchors + window + qo + books + partials}


# ------------------------------------------------------------------------------------------------ sections
@section("env")
def env(cmd):
    import triton
    if DRY:
        info = {"device": "cpu (dry run, Triton interpreter)", "sms": 8, "mem_gib": 0}
    else:
        p = torch.cuda.get_device_properties(0)
        info = {"device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
                "mem_gib": round(p.total_memory / 2**30, 1)}
    info |= {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": cmd}
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        info["git"] = ""
    RESULTS["env"] = info
    log("env", json.dumps(info))


@section("ceilings")
def ceilings():
    n = 2**16 if DRY else 2**29  # 1 GiB
    x = torch.randn(n, device=DEV, dtype=torch.float16)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), ms=300)
    bw = 2 * x.numel() * 2 / (t * 1e-3)
    m = 256 if DRY else 8192
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    bmat = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    tm = bench(lambda: a @ bmat, ms=300)
    RESULTS["ceilings"] = {"copy_GBps": bw / 1e9, "bf16_matmul_TFLOPs": 2 * m**3 / (tm * 1e-3) / 1e12}
    log("ceilings", RESULTS["ceilings"])
    del x, y, a, bmat
    empty_cache()


@section("correct_encode")
def correct_encode():
    out = {}
    for bits in ("1", "0.375"):
        cbk, _ = make_codebooks(bits, cent_dtype=torch.float32)
        x = torch.randn(1, HKV, 64 if DRY else 4096, D, device=DEV, dtype=torch.bfloat16) * 2
        xc = VQ.to_coding_space(x, cbk.transform, cbk.mean)
        codes, res = VQ.vq_encode_coding_space_triton(xc, cbk.centroids)
        rc, rr = cbk.encode_coding_space(xc)
        mine = (res.reshape(*res.shape[:3], -1, cbk.sub_dim) ** 2).sum(-1)
        theirs = (rr.reshape(*rr.shape[:3], -1, cbk.sub_dim) ** 2).sum(-1)
        c2, dx = VQ.vq_encode_triton(x, cbk.centroids, cbk.transform, cbk.inverse, cbk.mean)
        out[bits] = {"code_agreement": float((codes == rc.to(torch.uint8)).float().mean()),
                     "not_nearer_than_ref": bool((mine <= theirs + 1e-3 * (1 + theirs)).all()),
                     "residual_rel_err": rel(dx, cbk.decode(c2) - x.float())}
    RESULTS["correct_encode"] = out
    log("correct_encode", out)


@section("correct_prefill")
def correct_prefill():
    out = {}
    for dtype in ((torch.float16,) if DRY else (torch.bfloat16, torch.float16)):
        t = 70 if DRY else 2048
        q = torch.randn(1, HQ, t, D, device=DEV, dtype=dtype)
        k = torch.randn(1, HKV, t, D, device=DEV, dtype=dtype)
        v = torch.randn(1, HKV, t, D, device=DEV, dtype=dtype)
        dk = 0.3 * torch.randn(1, HKV, t, D, device=DEV)
        dv = 0.3 * torch.randn(1, HKV, t, D, device=DEV)
        ro, rl, rs = PA.prefill_attention_ans_reference(q, k, v, dk, dv, D**-0.5)
        o, l, s = PA.prefill_attention_ans_triton(q, k, v, dk, dv, D**-0.5)
        r, band = HQ // HKV, (16 if DRY else 256)  # row-sampled scores (AnTKVConfig.score_row_stride default)
        ss = PA.anchor_scores_triton(q, k, v, dk, dv, o, l, D**-0.5, row_stride=r, band=band)
        rss = PA.anchor_scores_reference(q, k, v, dk, dv, ro, rl, D**-0.5, r, band)
        out[str(dtype)] = {"out": rel(o, ro), "lse": rel(l, rl), "scores_two_pass": rel(s, rs),
                           f"scores_sampled_R{r}_band{band}": rel(ss, rss),
                           "nan": bool(o.isnan().any() or s.isnan().any() or ss.isnan().any())}
    RESULTS["correct_prefill"] = out
    log("correct_prefill", out)


@section("correct_decode")
def correct_decode():
    out = {}
    cases = [("1", 2, 8192, torch.bfloat16), ("1", 2, 8192, torch.float16), ("0.375", 2, 8192, torch.bfloat16),
             ("0.375", 2, 8192, torch.float16), ("1", 1, 131072, torch.bfloat16)]
    cases.append(("1", 2, 8192, "fp8cb"))
    if DRY:
        cases = [("1", 2, 300, torch.float16), ("0.375", 1, 200, torch.float16), ("1", 1, 200, "fp8cb")]
    for bits, b, ctx, dtype in cases:
        fp8 = dtype == "fp8cb"
        dtype = torch.float16 if fp8 else dtype
        args = decode_inputs(bits, b, ctx, dtype, seed=1)
        if fp8:
            args[11], args[14] = args[11].to(torch.float8_e4m3fn), args[14].to(torch.float8_e4m3fn)
        o_ref, l_ref = DA.decode_attention_reference(*args)
        o, l = DA.decode_attention_triton(*args, poison=True)
        out[f"{bits}bit_B{b}_{ctx}_{str(dtype)[6:]}{'_fp8cb' if fp8 else ''}"] = {
            "out": rel(o, o_ref), "lse": rel(l, l_ref), "nan": bool(o.isnan().any() or l.isnan().any())}
        del args, o_ref, l_ref
        empty_cache()
    RESULTS["correct_decode"] = out
    log("correct_decode", out)


@section("opcheck_cuda")
def opcheck_cuda():
    from antkv_compile.kernels import ops as O
    b, t, d = 1, 40, 64
    cbk, cbv = make_codebooks("1", heads=2, d=d, cent_dtype=torch.float32)
    q = torch.randn(b, 4, t, d, device=DEV, dtype=torch.float16)
    k = torch.randn(b, 2, t, d, device=DEV, dtype=torch.float16)
    v = torch.randn(b, 2, t, d, device=DEV, dtype=torch.float16)
    dk, dv = 0.2 * torch.randn(b, 2, t, d, device=DEV), 0.2 * torch.randn(b, 2, t, d, device=DEV)
    o, l = O.prefill_attention(q, k, v, 0.125)
    res = {}
    cases = {"vq_encode": (k, cbk.centroids, cbk.transform, cbk.inverse, cbk.mean),
             "prefill_attention": (q, k, v, 0.125), "anchor_scores": (q, k, v, dk, dv, o, l, 0.125),
             "prefill_attention_ans": (q, k, v, dk, dv, 0.125)}
    for name, a in cases.items():
        torch.library.opcheck(O.OPS[name], a)
        res[name] = "ok"
    cap, a_cap = 64, 4
    bufs = lambda: (torch.zeros(b, 2, cap, cbk.codes_per_vector, dtype=torch.uint8, device=DEV),  # noqa: E731
                    torch.zeros(b, 2, cap, cbv.codes_per_vector, dtype=torch.uint8, device=DEV),
                    torch.zeros(b, 2, a_cap, d, device=DEV, dtype=torch.float16),
                    torch.zeros(b, 2, a_cap, d, device=DEV, dtype=torch.float16),
                    torch.full((b, 2, a_cap), -1, dtype=torch.int32, device=DEV),
                    torch.full((b, 2, a_cap), float("-inf"), device=DEV),
                    torch.zeros(b, 2, 2, dtype=torch.int32, device=DEV))
    n0 = torch.zeros(b, dtype=torch.int32, device=DEV)
    torch.library.opcheck(O.window_flush, (*bufs(), n0, q, k, v, o, l, cbk.centroids, cbk.transform, cbk.inverse,
                                           cbk.mean, cbv.centroids, cbv.transform, cbv.inverse, cbv.mean, 0.125, 0.1,
                                           "ans"))
    res["window_flush"] = "ok"
    # flush on the GPU equals the CPU reference op
    gb, cb_ = list(bufs()), [x.cpu() for x in bufs()]
    O.window_flush(*gb, n0, q, k, v, o, l, cbk.centroids, cbk.transform, cbk.inverse, cbk.mean, cbv.centroids,
                   cbv.transform, cbv.inverse, cbv.mean, 0.125, 0.1, "ans")
    cpu = lambda x: x.cpu()  # noqa: E731
    O.window_flush(*cb_, n0.cpu(), cpu(q), cpu(k), cpu(v), cpu(o), cpu(l), *(cpu(x) for x in (
        cbk.centroids, cbk.transform, cbk.inverse, cbk.mean, cbv.centroids, cbv.transform, cbv.inverse, cbv.mean)),
        0.125, 0.1, "ans")
    res["flush_gpu_vs_cpu"] = {"codes_agree": float((gb[0].cpu() == cb_[0]).float().mean()),
                               "anchor_sets_equal": all(
                                   sorted(gb[4][0, h].cpu().tolist()) == sorted(cb_[4][0, h].tolist()) for h in range(2)),
                               "score_rel": rel(gb[5][gb[4] >= 0].cpu(), cb_[5][cb_[4] >= 0])}
    args = decode_inputs("1", 2, 4096, torch.float16, seed=3)
    torch.library.opcheck(O.decode_attention, tuple(args))
    res["decode_attention"] = "ok"
    # CUDA graph capture + replay with new inputs, and torch.compile(mode="reduce-overhead")
    static_q = args[0].clone()
    gargs = [static_q, *args[1:]]
    outs = {}

    def capture():
        outs["o"] = torch.ops.antkv.decode_attention(*gargs)[0]
    replay = graph_of(capture)
    new_q = torch.randn_like(static_q)
    static_q.copy_(new_q)
    replay()
    eager = torch.ops.antkv.decode_attention(new_q, *args[1:])[0]
    res["cuda_graph_replay_rel"] = rel(outs["o"], eager)

    def step(qq, *rest):
        return torch.ops.antkv.decode_attention(qq, *rest)[0] * 1.0

    if not DRY:
        cstep = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            got = cstep(new_q, *args[1:])
        res["compile_reduce_overhead_rel"] = rel(got, eager)
    RESULTS["opcheck_cuda"] = res
    log("opcheck_cuda", res)


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_probe(TAB, OUT, MODE: tl.constexpr, BN: tl.constexpr, VEC: tl.constexpr, ITERS: tl.constexpr):
        """Each lane gathers VEC consecutive fp16 (16 bytes) of a row of a 64 KB table; MODE 0: random row of
        4096, 1: random row of 256 (one 4 KB sub-space table), 2: consecutive rows (coalesced), 3: random
        row but the 32 lanes of a warp read 16 different 256-row tables (the non-subspace-major order)."""
        pid = tl.program_id(0)
        e = tl.arange(0, VEC)
        acc = tl.zeros([BN, VEC], tl.float32)
        for it in range(ITERS):
            offs = (pid * ITERS + it) * BN + tl.arange(0, BN)
            h = (offs * 1103515245 + 12345) >> 9
            if MODE == 0:
                row = h & 4095
            elif MODE == 1:
                row = h & 255
            elif MODE == 2:
                row = offs & 4095
            else:
                row = (offs % 16) * 256 + (h & 255)
            acc += tl.load(TAB + row[:, None] * VEC + e[None, :], cache_modifier=".ca").to(tl.float32)
        tl.store(OUT + (pid * BN + tl.arange(0, BN))[:, None] * VEC + e[None, :], acc)
    return _gather_probe


@section("micro")
def micro():
    """Gather throughput of the L1 path (evidence for the decode kernel's limit)."""
    k = _probe_kernel()
    tab = torch.randn(4096 * 8, device=DEV, dtype=torch.float16)
    sms = RESULTS["env"]["sms"]
    progs, bn, iters = (4, 32, 2) if DRY else (sms * 8, 256, 256)
    out = torch.empty(progs * bn * 8, device=DEV, dtype=torch.float32)
    res = {}
    for mode, name in ((0, "random_4096_rows"), (1, "random_256_rows"), (2, "coalesced"), (3, "16_tables_per_warp")):
        t = bench(lambda: k[(progs,)](tab, out, MODE=mode, BN=bn, VEC=8, ITERS=iters, num_warps=4))
        n = progs * bn * iters
        res[name] = {"ms": t, "gathers_per_ns": n / (t * 1e6), "gathers_per_clk_per_sm_at_1.98GHz": n / (t * 1e-3) / 1.98e9 / sms}
    RESULTS["micro"] = res
    log("micro", res)


@section("breakdown")
def breakdown(best):
    """Each launch alone (CUDA-graph replays)."""
    rows = []
    shapes = [("1", 1, 8192), ("1", 1, 131072), ("1", 32, 131072)]
    if DRY:
        shapes = [("1", 1, 300)]
    for bits, b, ctx in shapes:
        args = decode_inputs(bits, b, ctx, torch.float16, seed=5)
        cfg = dict(best.get(bits, {}))
        cent = cfg.pop("cent", "fp16")
        if cent == "fp8":
            args[11], args[14] = args[11].to(torch.float8_e4m3fn), args[14].to(torch.float8_e4m3fn)
        rec = {"bits": bits, "batch": b, "ctx": ctx, "cfg": cfg}
        plan = DA.DecodePlan(*args, **cfg)
        plan()
        rec["splits"] = list(plan.splits)
        for name, fn in (("prologue", plan.prologue), ("partials", plan.partials), ("all", plan)):
            rec[name + "_us"] = 1e3 * bench(graph_of(fn))
        args0 = list(args)
        args0[4] = torch.zeros_like(args[4])  # nothing coded: the prologue, exact programs and merge alone
        p0 = DA.DecodePlan(*args0, **cfg)
        p0()
        rec["all_nothing_coded_us"] = 1e3 * bench(graph_of(p0))
        k_ = DA.LAST_LAUNCH.get("decode")
        rec["regs"], rec["spills"] = getattr(k_, "n_regs", None), getattr(k_, "n_spills", None)
        rows.append(rec)
        log("breakdown", rec)
        del args, args0
        empty_cache()
    RESULTS["breakdown"] = rows


@section("decode_sweep")
def decode_sweep(quick):
    """Kernel configurations at two shapes; the best is used for the table."""
    base = dict(block_n=64, num_warps=4, num_stages=2, gather_cache=".ca")
    variants = [dict(base), dict(base, num_warps=8), dict(base, block_n=32), dict(base, num_warps=8, split_mult=0.5),
                dict(base, num_warps=8, split_mult=2), dict(base, split_mult=0.5), dict(base, num_stages=1),
                dict(base, num_warps=8, num_stages=1), dict(base, num_warps=8, cent="fp8"),
                dict(base, num_warps=8, cent="fp8", split_mult=0.5)]
    if quick:
        variants = variants[:3]
    shapes = [("1", 1, 131072), ("1", 8, 32768), ("0.375", 1, 131072)]
    if DRY:
        shapes, variants = [("1", 1, 500), ("0.375", 2, 300)], variants[:2] + variants[-1:]
    out = []
    sms = RESULTS['env']['sms']
    for bits, b, ctx in shapes:
        args = decode_inputs(bits, b, ctx, torch.float16, seed=2)
        o_ref, _ = DA.decode_attention_triton(*args)
        args8 = list(args)
        args8[11], args8[14] = args[11].to(torch.float8_e4m3fn), args[14].to(torch.float8_e4m3fn)
        o_ref8, _ = DA.decode_attention_triton(*args8)
        for var in variants:
            var = dict(var)
            mult = var.pop("split_mult", 1)
            cent = var.pop("cent", "fp16")
            a_ = args8 if cent == "fp8" else args
            pc, pa = DA.default_splits(b, HKV, ctx, args[5].shape[2], sms, var["block_n"], mult=mult)
            try:
                o, _ = DA.decode_attention_triton(*a_, splits=(pc, pa), **var)
                ok = rel(o, o_ref8 if cent == "fp8" else o_ref) < 1e-2
                replay = graph_of(lambda: DA.decode_attention_triton(*a_, splits=(pc, pa), **var))
                t = bench(replay)
                k = DA.LAST_LAUNCH.get("decode")
                regs = (getattr(k, "n_regs", None), getattr(k, "n_spills", None)) if k is not None else (None, None)
            except Exception as exc:  # noqa: BLE001
                log("variant failed", bits, b, ctx, var, exc)
                t, ok, regs = float("nan"), False, (None, None)
            rec = {"bits": bits, "batch": b, "ctx": ctx, **var, "split_mult": mult, "cent": cent, "splits": [pc, pa],
                   "ms": t, "ok": ok, "regs": regs[0], "spills": regs[1]}
            out.append(rec)
            log("decode_variant", rec)
        del args, args8, a_
        empty_cache()
    RESULTS["decode_sweep"] = out
    best = {}
    for bits in ("1", "0.375"):
        recs = [r for r in out if r["bits"] == bits and r["ok"] and r["ms"] == r["ms"]]
        if not recs:
            continue
        # rank variants by the sum of their normalized times over the shapes of this preset
        keyf = lambda r: tuple((k, r.get(k, False)) for k in ("block_n", "num_warps", "num_stages", "gather_cache",  # noqa: E731
                                                            "split_mult", "cent"))
        score: dict = {}
        for r in recs:
            base = min(x["ms"] for x in recs if (x["batch"], x["ctx"]) == (r["batch"], r["ctx"]))
            score.setdefault(keyf(r), []).append(r["ms"] / base)
        ranked = sorted(score, key=lambda k: sum(score[k]) / len(score[k]))
        best[bits] = dict(ranked[0])
        best[bits + "_fp16"] = dict(next(k for k in ranked if dict(k)["cent"] == "fp16"))
        fp8_ranked = [k for k in ranked if dict(k)["cent"] == "fp8"]
        if fp8_ranked:
            best[bits + "_fp8"] = dict(fp8_ranked[0])
        best[bits + "_second"] = dict(next((k for k in ranked[1:] if dict(k)["cent"] == dict(ranked[0])["cent"]), ranked[0]))
    RESULTS["decode_best"] = best
    log("decode_best", best)
    return best


@section("decode")
def decode_table(best, quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    copy_bw = RESULTS.get("ceilings", {}).get("copy_GBps", float("nan")) * 1e9
    sms = RESULTS['env']['sms']
    ctxs = [8192, 32768, 131072]
    batches = [1, 8] if quick else [1, 8, 32]
    if DRY:
        ctxs, batches = [200, 600], [1, 2]
    for ctx in ctxs:
        for b in batches:
            # FP16 SDPA decode (flash, GQA)
            q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.float16)
            k = torch.randn(b, HKV, ctx, D, device=DEV, dtype=torch.float16)
            v = torch.randn(b, HKV, ctx, D, device=DEV, dtype=torch.float16)
            backend = "flash"
            try:
                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                sdpa()
            except Exception:  # noqa: BLE001
                backend = "default"

                def sdpa():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            t_sdpa = bench(graph_of(sdpa))
            sdpa_bytes = 2 * b * HKV * ctx * D * 2 + 2 * b * HQ * D * 2
            del k, v
            empty_cache()
            for bits in ("1", "0.375"):
                args = decode_inputs(bits, b, ctx, torch.float16, seed=4)
                args8 = list(args)
                args8[11], args8[14] = args[11].to(torch.float8_e4m3fn), args[14].to(torch.float8_e4m3fn)
                cands = [best.get(bits + "_fp16"), best.get(bits + "_second"), best.get(bits), best.get(bits + "_fp8")]
                timed = {}
                for cfg in cands:
                    if not cfg:
                        continue
                    cfg = dict(cfg)
                    mult = cfg.pop("split_mult", 1)
                    cent = cfg.pop("cent", "fp16")
                    key = json.dumps([cent, mult, cfg], sort_keys=True)
                    if key in timed:
                        continue
                    a_ = args8 if cent == "fp8" else args
                    pc, pa = DA.default_splits(b, HKV, ctx, args[5].shape[2], sms, cfg.get("block_n", 64), mult=mult)
                    t = bench(graph_of(lambda: DA.decode_attention_triton(*a_, splits=(pc, pa), **cfg)))
                    timed[key] = (t, cent, [pc, pa])
                fp16 = min((v for v in timed.values() if v[1] == "fp16"), key=lambda v: v[0])
                fp8 = min((v for v in timed.values() if v[1] == "fp8"), key=lambda v: v[0], default=None)
                t, _, spl = fp16
                by = decode_bytes(args, sum(spl))
                rec = {"bits": bits, "ctx": ctx, "batch": b, "ms": t, "sdpa_ms": t_sdpa, "sdpa_backend": backend,
                       "speedup": t_sdpa / t, "bytes": by, "GBps": by["total"] / (t * 1e-3) / 1e9,
                       "bw_frac": by["total"] / (t * 1e-3) / copy_bw, "sdpa_GBps": sdpa_bytes / (t_sdpa * 1e-3) / 1e9,
                       "byte_ratio": sdpa_bytes / by["total"], "splits": spl, "configs_timed": timed,
                       "ms_fp8_centroids": fp8[0] if fp8 else None,
                       "speedup_fp8_centroids": t_sdpa / fp8[0] if fp8 else None}
                rows.append(rec)
                log("decode", {k_: v_ for k_, v_ in rec.items() if k_ not in ("bytes", "configs_timed")})
                del args, args8
                empty_cache()
    RESULTS["decode"] = rows


@section("prefill")
def prefill(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    fwd_cfgs = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    # score kernel: (BLOCK_M, BLOCK_N, warps, stages); the first four also run the row-sampled scores
    ans_cfgs = [(64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3)]
    ts = [8192] if quick else [8192, 32768]
    if DRY:
        ts, fwd_cfgs, ans_cfgs = [100], [(32, 32, 4, 1)], [(32, 32, 4, 1)]
    for t in ts:
        dtype = torch.float16
        q = torch.randn(1, HQ, t, D, device=DEV, dtype=dtype)
        k = torch.randn(1, HKV, t, D, device=DEV, dtype=dtype)
        v = torch.randn(1, HKV, t, D, device=DEV, dtype=dtype)
        dk = (0.3 * torch.randn(1, HKV, t, D, device=DEV)).to(dtype)
        dv = (0.3 * torch.randn(1, HKV, t, D, device=DEV)).to(dtype)
        scale = D**-0.5
        ms = 400 if t > 8192 else 200

        def sdpa():
            if DRY:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        t_sdpa = bench(sdpa, ms=ms)
        flops = 4 * HQ * t * t * D / 2
        rec = {"T": t, "sdpa_ms": t_sdpa, "sdpa_TFLOPs": flops / (t_sdpa * 1e-3) / 1e12}
        fwd = {}
        for cfg in fwd_cfgs:
            try:
                fwd[cfg] = bench(lambda: PA.prefill_attention_triton(q, k, v, scale, blocks=cfg), ms=ms)
            except Exception as exc:  # noqa: BLE001
                log("fwd cfg failed", cfg, exc)
        best_fwd = min(fwd, key=fwd.get)
        out, lse = PA.prefill_attention_triton(q, k, v, scale, blocks=best_fwd)
        ans = {}
        for cfg in ans_cfgs:
            try:
                ans[cfg] = bench(lambda: PA.anchor_scores_triton(q, k, v, dk, dv, out, lse, scale, blocks=cfg), ms=ms)
            except Exception as exc:  # noqa: BLE001
                log("ans cfg failed", cfg, exc)
        best_ans = min(ans, key=ans.get)
        # row-sampled scores (AnTKVConfig.score_row_stride; default R = G with band 256)
        sampled = {}
        for r, band in ([(HQ // HKV, 16)] if DRY else [(HQ // HKV, 256), (HQ // HKV, 128), (8, 256), (8, 128)]):
            for cfg in ans_cfgs[:4]:
                try:
                    sampled[(r, band, cfg)] = bench(lambda: PA.anchor_scores_triton(
                        q, k, v, dk, dv, out, lse, scale, blocks=cfg, row_stride=r, band=band), ms=ms)
                except Exception as exc:  # noqa: BLE001
                    log("sampled ans cfg failed", r, band, cfg, exc)
        sampled_best = {}
        for (r, band, cfg), x in sampled.items():
            key = f"R{r}_band{band}"
            if key not in sampled_best or x < sampled_best[key]["ms"]:
                sampled_best[key] = {"ms": x, "blocks": cfg, "attn_plus_scores_ms": fwd[best_fwd] + x,
                                     "ratio_vs_sdpa": (fwd[best_fwd] + x) / t_sdpa}
        rec["sampled"] = sampled_best
        rec["sampled_ms"] = {f"R{r}_band{band} {cfg}": x for (r, band, cfg), x in sampled.items()}
        enc = {}
        for bits in ("1", "0.375"):
            cbk, cbv = make_codebooks(bits, cent_dtype=torch.float32)
            enc[bits] = bench(lambda: (VQ.vq_encode_triton(k, cbk.centroids, cbk.transform, cbk.inverse, cbk.mean),
                                       VQ.vq_encode_triton(v, cbv.centroids, cbv.transform, cbv.inverse, cbv.mean)), ms=ms)
        a = math.ceil(0.01 * t)
        sel_bufs = (torch.zeros(1, HKV, a, D, device=DEV, dtype=dtype), torch.zeros(1, HKV, a, D, device=DEV, dtype=dtype),
                    torch.full((1, HKV, a), -1, dtype=torch.int32, device=DEV),
                    torch.full((1, HKV, a), float("-inf"), device=DEV),
                    torch.zeros(1, HKV, math.ceil(t / 32), dtype=torch.int32, device=DEV))
        sc = torch.rand(1, HKV, t, device=DEV)
        n0 = torch.zeros(1, dtype=torch.int32, device=DEV)
        t_sel = bench(lambda: AN.select_anchors_(*sel_bufs, sc, k, v, n0, 0.01), ms=ms)
        t_ans = min(ans.values())
        rec.update({"fwd_ms": fwd, "ans_ms": ans, "encode_ms": enc, "select_ms": t_sel,
                    "best_fwd": best_fwd, "best_ans": best_ans, "fwd_TFLOPs": flops / (fwd[best_fwd] * 1e-3) / 1e12,
                    "attn_plus_scores_ms": fwd[best_fwd] + t_ans})
        rec["ratio_vs_sdpa"] = rec["attn_plus_scores_ms"] / t_sdpa
        for bits in ("1", "0.375"):
            rec[f"pipeline_ms_{bits}"] = rec["attn_plus_scores_ms"] + enc[bits] + t_sel
            rec[f"pipeline_ratio_{bits}"] = rec[f"pipeline_ms_{bits}"] / t_sdpa
        rows.append({kk: ({str(c): x for c, x in vv.items()} if isinstance(vv, dict) else vv) for kk, vv in rec.items()})
        log("prefill", rows[-1])
        del q, k, v, dk, dv, out, lse
        empty_cache()
    RESULTS["prefill"] = rows


@section("flush")
def flush_timing():
    """Decode-time window flush (W = 64) at B = 8 into a 32K store: encode + scores + selection."""
    b, w, cap = (2, 8, 64) if DRY else (8, 64, 32768)
    dtype = torch.float16
    cbk, cbv = make_codebooks("1", cent_dtype=torch.float32)
    a = math.ceil(0.01 * cap)
    c = cbk.codes_per_vector
    bufs = (torch.zeros(b, HKV, cap, c, dtype=torch.uint8, device=DEV), torch.zeros(b, HKV, cap, c, dtype=torch.uint8, device=DEV),
            torch.zeros(b, HKV, a, D, device=DEV, dtype=dtype), torch.zeros(b, HKV, a, D, device=DEV, dtype=dtype),
            torch.full((b, HKV, a), -1, dtype=torch.int32, device=DEV), torch.full((b, HKV, a), float("-inf"), device=DEV),
            torch.zeros(b, HKV, cap // 32, dtype=torch.int32, device=DEV))
    n0 = torch.full((b,), 10 if DRY else 1000, dtype=torch.int32, device=DEV)
    q = torch.randn(b, HQ, w, D, device=DEV, dtype=dtype)
    k = torch.randn(b, HKV, w, D, device=DEV, dtype=dtype)
    v = torch.randn(b, HKV, w, D, device=DEV, dtype=dtype)
    o, lse = PA.prefill_attention_triton(q, k, v, D**-0.5)
    cb = (cbk.centroids, cbk.transform, cbk.inverse, cbk.mean, cbv.centroids, cbv.transform, cbv.inverse, cbv.mean)
    fn = lambda: torch.ops.antkv.window_flush(*bufs, n0, q, k, v, o, lse, *cb, D**-0.5, 0.01, "ans")  # noqa: E731
    t_eager = bench(fn)
    t_graph = bench(graph_of(fn))
    # the score kernel alone at the flush's shape (its oldest w / 2 keys over the window's w queries), per block shape
    dk, dv = (0.3 * torch.randn(b, HKV, w // 2, D, device=DEV)).to(dtype), (0.3 * torch.randn(b, HKV, w // 2, D, device=DEV)).to(dtype)
    kk, vv = k[:, :, : w // 2], v[:, :, : w // 2]
    scores = {str(cfg): bench(lambda: PA.anchor_scores_triton(q, kk, vv, dk, dv, o, lse, D**-0.5, blocks=cfg))
              for cfg in ([None] if DRY else [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2), None])}
    RESULTS["flush"] = {"batch": b, "window": w, "eager_ms": t_eager, "graph_ms": t_graph, "scores_ms": scores}
    log("flush", RESULTS["flush"])


# ------------------------------------------------------------------------------------------------ report
def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = RESULTS.get("decode") or []
    for bits, ls in (("1", "-"), ("0.375", "--")):
        for b in sorted({r["batch"] for r in rows}):
            rr = [r for r in rows if r["bits"] == bits and r["batch"] == b]
            if rr:
                axes[0].plot([r["ctx"] // 1024 for r in rr], [r["speedup"] for r in rr], ls, marker="o",
                             label=f"{bits} bit, B={b}")
    axes[0].axhline(8, color="gray", lw=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("context (K tokens)")
    axes[0].set_ylabel("speed-up over FP16 SDPA flash decode")
    axes[0].set_title("decode attention (Llama-3-8B heads)")
    axes[0].legend(fontsize=7)
    pre = RESULTS.get("prefill") or []
    if pre:
        labels = [f"{r['T'] // 1024}K" for r in pre]
        x = range(len(pre))
        axes[1].bar([i - 0.2 for i in x], [r["ratio_vs_sdpa"] for r in pre], 0.4, label="attention + Anchor Scores")
        axes[1].bar([i + 0.2 for i in x], [r.get("pipeline_ratio_1", 0) for r in pre], 0.4,
                    label="+ encode + selection (1 bit)")
        axes[1].axhline(1.3, color="gray", lw=0.8)
        axes[1].set_xticks(list(x), labels)
        axes[1].set_ylabel("time / FP16 SDPA flash prefill")
        axes[1].set_title("prefill")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table() -> str:
    lines = []
    env_ = RESULTS.get("env", {})
    ce = RESULTS.get("ceilings", {})
    lines.append(f"device {env_.get('device')}  torch {env_.get('torch')}  triton {env_.get('triton')}  "
                 f"copy {ce.get('copy_GBps', float('nan')):.0f} GB/s  bf16 mm {ce.get('bf16_matmul_TFLOPs', float('nan')):.0f} TFLOP/s")
    lines.append("DECODE (ms, median; FP16 SDPA flash+GQA vs antkv, CUDA-graph replays)")
    lines.append(f"{'bits':>5} {'ctx':>7} {'B':>3} {'sdpa':>8} {'antkv':>8} {'x':>6} {'GB/s':>7} {'%copy':>6} {'bytes x':>7}"
                 f" {'fp8cb':>8} {'x fp8cb':>7}")
    for r in RESULTS.get("decode") or []:
        f8 = r.get("ms_fp8_centroids") or float("nan")
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>3} {r['sdpa_ms']:8.3f} {r['ms']:8.3f} {r['speedup']:6.2f} "
                     f"{r['GBps']:7.0f} {100 * r['bw_frac']:6.1f} {r['byte_ratio']:7.1f} {f8:8.3f} {r['sdpa_ms'] / f8:7.2f}")
    lines.append("PREFILL (ms; B=1, fp16)")
    lines.append(f"{'T':>6} {'sdpa':>8} {'fwd':>8} {'scores':>8} {'attn+AnS':>9} {'ratio':>6} {'enc1':>7} "
                 f"{'enc.375':>7} {'sel':>6} {'pipe1 x':>7}")
    for r in RESULTS.get("prefill") or []:
        fwd = min(r["fwd_ms"].values())
        ans = min(r["ans_ms"].values())
        lines.append(f"{r['T']:>6} {r['sdpa_ms']:8.2f} {fwd:8.2f} {ans:8.2f} {r['attn_plus_scores_ms']:9.2f} "
                     f"{r['ratio_vs_sdpa']:6.2f} {r['encode_ms']['1']:7.2f} {r['encode_ms']['0.375']:7.2f} "
                     f"{r['select_ms']:6.2f} {r['pipeline_ratio_1']:7.2f}")
        for key, x in (r.get("sampled") or {}).items():
            lines.append(f"{'':>6} row-sampled scores {key}: scores {x['ms']:.2f} ms, attn+AnS {x['attn_plus_scores_ms']:.2f} "
                         f"ms = {x['ratio_vs_sdpa']:.2f}x SDPA (blocks {x['blocks']})")
    for name in ("decode_best", "micro", "breakdown", "correct_encode", "correct_prefill", "correct_decode", "opcheck_cuda",
                 "flush"):
        if name in RESULTS:
            lines.append(f"{name}: {json.dumps(RESULTS[name], default=str)}")
    bad = [k for k, v in RESULTS["sections"].items() if not v["ok"]]
    lines.append(f"sections failed: {bad}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- decode only (v3)
V3_VARIANTS = {  # name -> decode_attention_triton options (split_mult handled separately)
    "fused": dict(key_lut=False),
    "v3": dict(key_lut=True),
    "v3_m2": dict(key_lut=True, split_mult=2),
    "v3_m0.5": dict(key_lut=True, split_mult=0.5),
    "v3_w8": dict(key_lut=True, num_warps=8),
    "v3_s2": dict(key_lut=True, num_stages=2),
    "v3_b128": dict(key_lut=True, block_n=128, num_warps=8),
    "v3_m2_s2": dict(key_lut=True, split_mult=2, num_stages=2),
}


# The post-RoPE Triton coded loop (key LUT; the post-RoPE recipe's decode on every device, NOTES.md "Coded decode,
# Triton"): "lean" is its default, the v3 variants its split / warp / stage / block options. Variants of earlier
# designs were measured and removed; see NOTES.md and git history.
V4_VARIANTS = {
    "lean": dict(key_lut=True),
}
V5_DEFAULT = ["lean"]
ALL_VARIANTS = {**V3_VARIANTS, **V4_VARIANTS}
NOT_EXACT: set = set()


def _opts(name):
    return {k: v for k, v in ALL_VARIANTS[name].items() if k != "split_mult"}


def _decode(args, name, **extra):
    """One decode call of variant ``name``."""
    return DA.decode_attention_triton(*args, **extra, **_opts(name))


def _run_variant(a_, b, ctx, name, sms):
    cfg = dict(ALL_VARIANTS[name])
    mult = cfg.pop("split_mult", 1)
    pc, pa = DA.default_splits(b, HKV, ctx, a_[5].shape[2], sms, cfg.get("block_n", 64), mult=mult)
    return (lambda: DA.decode_attention_triton(*a_, splits=(pc, pa), **cfg)), [pc, pa]


def warm_variant(name, shapes):
    """Subprocess body of --warm: compile `name` for the given (bits, B, ctx, dtype) shapes (fills the on-disk
    Triton cache, so the main process only loads the kernels)."""
    for bits, b, ctx, dt in shapes:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        args = decode_inputs(bits, b, ctx, getattr(torch, dt), seed=1)
        fn, _ = _run_variant(args, b, ctx, name, sms)
        fn()
        _decode(args, name, poison=True)
        torch.cuda.synchronize()


@section("decode_warm")
def warm_all(names, jobs=12):
    """Compile every (variant, preset, split-count class) in parallel subprocesses (~3-4 s per compile, ~50
    compiles): the kernels' specializations differ by preset (constexprs) and by the coded split count being
    a multiple of 16 or not (B = 1: 32 or 64 splits, B = 32: 5 or 10), so 8K at B = 1 and B = 32 cover the
    grid; plus the correctness shapes (5000 tokens: capacity not a multiple of 16; bf16)."""
    import concurrent.futures as cf
    tasks = []
    for n in names:
        for bits in ("1", "0.375"):
            shapes = [(bits, 1, 8192, "float16"), (bits, 32, 8192, "float16")]
            if bits == "1":
                shapes.append((bits, 3, 5000, "float16"))
                if n in ("v3", "lean"):
                    shapes.append((bits, 1, 8192, "bfloat16"))
            tasks.append((n, shapes))
    t0 = time.time()

    def run(task):
        cmd = [sys.executable, os.path.abspath(__file__), "--warm", json.dumps(task)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return task[0], r.returncode, r.stderr[-400:]

    with cf.ThreadPoolExecutor(jobs) as ex:
        res = list(ex.map(run, tasks))
    bad = [(n, rc, err) for n, rc, err in res if rc != 0]
    log(f"warm-up: {len(tasks)} tasks in {time.time() - t0:.0f} s; failed: {bad}")


@section("decode_only")
def decode_only(variants=None, rep_ms=100, grid=None):
    """Correctness of every variant, then every variant timed on the whole grid (1 and 0.375 bit x 8K/32K/128K x
    B = 1/8/32, CUDA-graph replays), then a table: ms per variant, the best exact one against FP16 SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sms = RESULTS["env"]["sms"]
    copy_bw = RESULTS.get("ceilings", {}).get("copy_GBps", float("nan")) * 1e9
    small = DRY
    names = list(variants or V5_DEFAULT)
    base_name = "v3" if "v3" in names else names[0]
    RESULTS["decode_variants"] = {n: {k: str(v) for k, v in ALL_VARIANTS[n].items()} for n in names}
    # correctness: every exact variant vs the reference (fresh random inputs per shape), poisoned partials,
    # then the default-split launch and (GPU) two CUDA-graph replays (the arrival / claim counters are reset)
    corr = {}
    cshapes = [("1", 2, 8192, torch.float16), ("0.375", 2, 8192, torch.float16), ("1", 3, 5000, torch.float16),
               ("1", 1, 131072, torch.bfloat16)]
    if small:
        cshapes = [("1", 2, 300, torch.float16), ("0.375", 1, 200, torch.float32)]
    for bits, b, ctx, dt in cshapes:
        args = decode_inputs(bits, b, ctx, dt, seed=17 + b)
        ref_o, ref_l = DA.decode_attention_reference(*args)
        for name in names:
            if name in NOT_EXACT or (dt == torch.bfloat16
                                     and name not in (base_name, "lean")):
                continue  # bf16: one more compile per variant; checked for the main candidates only
            try:
                fn, _ = _run_variant(args, b, ctx, name, sms)
                o, l_ = _decode(args, name, poison=True)
                o2, l2 = fn()
                rec = _correctness(o, l_, o2, ref_o, ref_l, None if small else fn)
            except Exception as exc:  # noqa: BLE001 - report and go on
                rec = {"error": repr(exc)[:500], "nan": True, "out": float("inf"), "out_splits": float("inf")}
            rec["variant"] = name
            corr[f"{bits}_B{b}_{ctx}_{str(dt)[6:]}_{name}"] = rec
            log("correct", bits, b, ctx, dt, name, rec)
        del args
        empty_cache()
    RESULTS["correct_v4"] = corr
    bad = sorted({r["variant"] for r in corr.values()
                  if r["nan"] or max(r["out"], r["out_splits"], r.get("graph", 0)) > 6e-3})
    RESULTS["correct_v4_bad"] = bad
    log("correct_v4_bad (variants dropped from 'best')", bad)
    # the grid: every variant at every shape
    shapes = grid or [(bits, ctx, b) for bits in ("1", "0.375") for ctx in (8192, 32768, 131072) for b in (1, 8, 32)]
    if small:
        shapes = [("1", 200, 1), ("0.375", 300, 2)]
    rows, sdpa_t = [], {}
    for bits, ctx, b in shapes:
        if (ctx, b) not in sdpa_t:
            sdpa_t[(ctx, b)] = _sdpa_decode_ms(b, ctx, rep_ms, flash=not small)
            empty_cache()
        args = decode_inputs(bits, b, ctx, torch.float16, seed=4)
        timed = {}
        for name in names:
            try:
                fn, spl = _run_variant(args, b, ctx, name, sms)
                t = bench(graph_of(fn), ms=rep_ms, warm=25)
                k_ = DA.LAST_LAUNCH.get("decode")
                timed[name] = {"ms": t, "splits": spl, "regs": getattr(k_, "n_regs", None),
                               "spills": getattr(k_, "n_spills", None)}
            except Exception as exc:  # noqa: BLE001
                log("variant failed", name, bits, ctx, b, repr(exc)[:300])
                timed[name] = {"ms": float("nan"), "splits": None, "error": repr(exc)[:300]}
            log("variant", bits, ctx, b, name, timed[name])
        ok = [n for n in names if n not in NOT_EXACT and n not in bad and timed[n]["ms"] == timed[n]["ms"]]
        best = min(ok, key=lambda n: timed[n]["ms"]) if ok else base_name
        t = timed[best]["ms"]
        by = decode_bytes(args, sum(timed[best]["splits"] or [1]))
        rec = {"bits": bits, "ctx": ctx, "batch": b, "sdpa_ms": sdpa_t[(ctx, b)], "best": best, "ms": t,
               "base_ms": timed[base_name]["ms"], "speedup": sdpa_t[(ctx, b)] / t,
               "speedup_base": sdpa_t[(ctx, b)] / timed[base_name]["ms"],
               "GBps": by["total"] / (t * 1e-3) / 1e9, "bw_frac": by["total"] / (t * 1e-3) / copy_bw,
               "timed": timed}
        rows.append(rec)
        log("decode", {k_: v_ for k_, v_ in rec.items() if k_ != "timed"})
        del args
        empty_cache()
        if PARTIAL:
            RESULTS["decode_v4"] = rows
            with open(PARTIAL, "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    RESULTS["decode_v4"] = rows
    # tables: ms of every variant; then the best exact variant vs SDPA; then each variant's geometric-mean
    # speed-up over the base (v3) per preset
    w = max(9, max(len(n) for n in names) + 2)
    lines = [f"DECODE v4 (ms, median of CUDA-graph replays; FP16 SDPA flash+GQA; base = {base_name})",
             f"{'bits':>5} {'ctx':>7} {'B':>3} {'sdpa':>8} " + "".join(f"{n:>{w}}" for n in names)]
    for r in rows:
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>3} {r['sdpa_ms']:8.3f} "
                     + "".join(f"{r['timed'][n]['ms']:{w}.3f}" for n in names))
    lines += ["", f"{'bits':>5} {'ctx':>7} {'B':>3} {'sdpa':>8} {'base':>8} {'best':>8} {'x sdpa':>7} "
                  f"{'x base':>7} {'GB/s':>6} {'%copy':>6}  best variant"]
    for r in rows:
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>3} {r['sdpa_ms']:8.3f} {r['base_ms']:8.3f} "
                     f"{r['ms']:8.3f} {r['speedup']:7.2f} {r['speedup_base']:7.2f} {r['GBps']:6.0f} "
                     f"{100 * r['bw_frac']:6.1f}  {r['best']}")
    lines += ["", "geometric-mean speed-up over the base per preset (regs/spills at the last shape)"]
    for n in names:
        parts = []
        for bits in ("1", "0.375"):
            xs = [r["base_ms"] / r["timed"][n]["ms"] for r in rows if r["bits"] == bits and r["timed"][n]["ms"] > 0]
            parts.append(f"{bits} bit {math.exp(sum(map(math.log, xs)) / len(xs)):5.2f}x" if xs else f"{bits} bit  -")
        last = next((r["timed"][n] for r in reversed(rows)), {})
        note = ("  (probe, not exact)" if n in NOT_EXACT else "") + ("  (FAILED correctness)" if n in bad else "")
        lines.append(f"  {n:<{w}} " + "  ".join(parts) + f"   regs {last.get('regs')} spills {last.get('spills')}" + note)
    log("\n".join(lines))


def main_decode_only(out_dir, variants=None, rep_ms=100, grid=None, warm=True):
    env(" ".join(["python"] + sys.argv))
    if warm and not DRY:
        warm_all(list(variants or V5_DEFAULT))
    ceilings()
    decode_only(variants, rep_ms, grid)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(out_dir, f"kernels_bench_decode_{stamp}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"kernels_bench_decode_{stamp}.log"), "w") as f:
        f.write("\n".join(LOG))


# ------------------------------------------------------------------------------------ pre-RoPE pair-layout keys
# kernels/rope_decode.py (NOTES.md "Pre-RoPE pair-layout decode"): the coded programs decode pre-RoPE keys through a
# table with the map and mean folded in and rotate each pair by its slot in registers. Options of DecodePlan's rope
# path; "rope" is the default. The sweep is small on purpose: one GPU run picks the best.
ROPE_VARIANTS = {
    "rope": dict(),  # the default: the CUDA C++ kernel (rope_decode.cu: factored angle, fp16x2 rotation, 256 threads)
    "rope_triton": dict(rope_impl="triton"),  # the Triton kernel (libdevice cos / sin per element)
}
# (the Triton kernel's block / warp / stage / rotation variants and the CUDA kernel's earlier designs were measured and
# removed: NOTES.md "Pre-RoPE pair-layout decode", "CUDA C++ kernel")


def _rope_opts(name):
    """DecodePlan options of a rope variant."""
    return dict(ROPE_VARIANTS[name])


ROPE_THETA = 500000.0  # Llama-3


def rope_inputs(args, seed=0):
    """The post-RoPE decode inputs with the key codebook replaced by a pre-RoPE one in the RoPE-pair layout (random
    pair order per head, the same random centroids and mean), as rope_decode_triton takes them: the codes, anchors
    and window are the same tensors, so both paths read the same bytes."""
    from antkv_compile.kernels.rope_decode import rope_key_tables
    from antkv_compile.numerics.rope_pairs import pair_transform

    g = torch.Generator().manual_seed(seed)
    cent = args[11]
    st_, h, s_, m, sd = cent.shape
    tr, inv = pair_transform(torch.stack([torch.randperm(D // 2, generator=g) for _ in range(h)]))
    cb = Codebook(cent.float().cpu(), tr, inv, args[13].float().cpu())
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, D, 2).float() / D)
    table, pairs, freq = rope_key_tables(cb, inv_freq, torch.float16 if cent.dtype != torch.float32 else torch.float32,
                                         DEV)
    return [*args[:11], table, pairs, freq, *args[14:], 1.0]


def _rope_fn(rargs, name):
    """A DecodePlan of variant ``name`` over rope inputs (one plan reused by every replay) and its splits."""
    opts = _rope_opts(name)
    q, rest = rargs[0], rargs[1:]
    plan = DA.DecodePlan(q, *rest[:11], None, None, *rest[13:17], rope_keys=(rest[11], rest[12], rest[17]), **opts)
    return plan, list(plan.splits)


@section("decode_rope")
def decode_rope(variants=None, rep_ms=100, grid=None):
    """Pre-RoPE pair-layout decode: correctness of every variant against rope_decode_reference (poisoned partials,
    the plan's own launch, two CUDA-graph replays), then the grid (default: 1 bit, 128K B = 1/8/32 and 32K B = 128)
    against FP16 SDPA (flash) and the post-RoPE recipe's decode (the Triton loop, "lean") on the same codes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from antkv_compile.kernels.rope_decode import rope_decode_reference
    sms = RESULTS["env"]["sms"]
    copy_bw = RESULTS.get("ceilings", {}).get("copy_GBps", float("nan")) * 1e9
    names = list(variants or ROPE_VARIANTS)
    RESULTS["rope_variants"] = {n: {k: str(v) for k, v in ROPE_VARIANTS[n].items()} for n in names}
    if "rope" in RESULTS["rope_variants"]:
        RESULTS["rope_variants"]["rope"]["impl"] = "auto (CUDA where it runs)"
    corr = {}
    cshapes = [("1", 2, 8192, torch.float16), ("1", 3, 5000, torch.float16), ("1", 1, 131072, torch.bfloat16),
               ("1", 1, 131072, torch.float16)]
    if DRY:
        cshapes = [("1", 2, 300, torch.float16), ("1", 1, 200, torch.float32)]
    for bits, b, ctx, dt in cshapes:
        rargs = rope_inputs(decode_inputs(bits, b, ctx, dt, seed=17 + b), seed=17 + b)
        ref_o, ref_l = rope_decode_reference(*rargs)
        for name in names:
            try:
                plan, _ = _rope_fn(rargs, name)
                o, l_ = DA.DecodePlan(rargs[0], *rargs[1:12], None, None, *rargs[14:18], poison=True,
                                      rope_keys=(rargs[12], rargs[13], rargs[18]), **_rope_opts(name))()
                o2, _ = plan()
                rec = _correctness(o, l_, o2, ref_o, ref_l, None if DRY else plan)
            except Exception as exc:  # noqa: BLE001 - report and go on
                rec = {"error": repr(exc)[:500], "nan": True, "out": float("inf"), "out_splits": float("inf")}
            rec["variant"] = name
            corr[f"{bits}_B{b}_{ctx}_{str(dt)[6:]}_{name}"] = rec
            log("correct rope", bits, b, ctx, dt, name, rec)
        del rargs, ref_o, ref_l
        empty_cache()
    RESULTS["correct_rope"] = corr
    bad = sorted({r["variant"] for r in corr.values()
                  if r["nan"] or max(r["out"], r["out_splits"], r.get("graph", 0)) > 6e-3})
    RESULTS["correct_rope_bad"] = bad
    log("correct_rope_bad (variants dropped from 'best')", bad)
    shapes = grid or [("1", 131072, 1), ("1", 131072, 8), ("1", 131072, 32), ("1", 32768, 128)]
    if DRY:
        shapes = [("1", 200, 1), ("1", 300, 2)]
    rows = []
    for bits, ctx, b in shapes:
        sdpa_ms = _sdpa_decode_ms(b, ctx, rep_ms, flash=not DRY)
        empty_cache()
        args = decode_inputs(bits, b, ctx, torch.float16, seed=4)
        timed = {}
        try:  # the post-RoPE recipe's decode (the Triton loop, default options) on the same codes
            fn, spl = _run_variant(args, b, ctx, "lean", sms)
            timed["post_rope"] = {"ms": bench(graph_of(fn), ms=rep_ms, warm=25), "splits": spl}
        except Exception as exc:  # noqa: BLE001
            timed["post_rope"] = {"ms": float("nan"), "error": repr(exc)[:300]}
        rargs = rope_inputs(args, seed=4)
        for name in names:
            try:
                plan, spl = _rope_fn(rargs, name)
                t = bench(graph_of(plan), ms=rep_ms, warm=25)
                k_ = DA.LAST_LAUNCH.get("rope_coded")
                rec = {"ms": t, "splits": spl, "regs": getattr(k_, "n_regs", getattr(k_, "regs", None)),
                       "spills": getattr(k_, "n_spills", getattr(k_, "local_bytes", None)),
                       "kernel": type(k_).__name__}
                if not DRY:  # the coded launch alone (after the prologue's counter fill)
                    rec["coded_ms"] = bench(graph_of(lambda: (plan.prologue(), plan.rope_partials())), ms=rep_ms,
                                            warm=25)
                timed[name] = rec
            except Exception as exc:  # noqa: BLE001
                log("rope variant failed", name, bits, ctx, b, repr(exc)[:300])
                timed[name] = {"ms": float("nan"), "splits": None, "error": repr(exc)[:300]}
            log("rope variant", bits, ctx, b, name, timed[name])
        ok = [n for n in names if n not in bad and timed[n]["ms"] == timed[n]["ms"]]
        best = min(ok, key=lambda n: timed[n]["ms"]) if ok else names[0]
        t = timed[best]["ms"]
        by = decode_bytes(args, sum(timed[best]["splits"] or [1]))
        floor_ms = by["total"] / copy_bw * 1e3
        rec = {"bits": bits, "ctx": ctx, "batch": b, "sdpa_ms": sdpa_ms, "best": best, "ms": t,
               "default_ms": timed[names[0]]["ms"], "speedup": sdpa_ms / t,
               "post_rope_ms": timed.get("post_rope", {}).get("ms"), "bytes": by,
               "floor_ms": floor_ms, "bw_frac": floor_ms / t, "timed": timed}
        rows.append(rec)
        log("decode rope", {k_: v_ for k_, v_ in rec.items() if k_ not in ("timed", "bytes")})
        del args, rargs
        empty_cache()
        if PARTIAL:
            RESULTS["decode_rope"] = rows
            with open(PARTIAL, "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    RESULTS["decode_rope"] = rows
    w = max(9, max(len(n) for n in names) + 2)
    lines = ["DECODE pre-RoPE pair layout (ms, median of CUDA-graph replays; FP16 SDPA flash + GQA; post-RoPE = the "
             "Triton loop on the same codes; floor = bytes / copy bandwidth)",
             f"{'bits':>5} {'ctx':>7} {'B':>4} {'sdpa':>8} {'postrope':>9} " + "".join(f"{n:>{w}}" for n in names)]
    for r in rows:
        pc = r["post_rope_ms"]
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>4} {r['sdpa_ms']:8.3f} "
                     f"{(pc if pc is not None else float('nan')):9.3f} "
                     + "".join(f"{r['timed'][n]['ms']:{w}.3f}" for n in names))
    lines += ["", "coded launch alone (ms)",
              f"{'bits':>5} {'ctx':>7} {'B':>4} " + "".join(f"{n:>{w}}" for n in names)]
    for r in rows:
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>4} "
                     + "".join(f"{r['timed'][n].get('coded_ms', float('nan')):{w}.3f}" for n in names))
    lines += ["", f"{'bits':>5} {'ctx':>7} {'B':>4} {'sdpa':>8} {'best':>8} {'x sdpa':>7} {'floor':>7} {'%floor':>7}"
                  f"  best variant (regs / spills of its coded kernel)"]
    for r in rows:
        tb = r["timed"][r["best"]]
        lines.append(f"{r['bits']:>5} {r['ctx']:>7} {r['batch']:>4} {r['sdpa_ms']:8.3f} {r['ms']:8.3f} "
                     f"{r['speedup']:7.2f} {r['floor_ms']:7.3f} {100 * r['bw_frac']:7.1f}  {r['best']} "
                     f"({tb.get('regs')} / {tb.get('spills')})")
    log("\n".join(lines))


def main_decode_rope(out_dir, variants=None, rep_ms=100, grid=None):
    env(" ".join(["python"] + sys.argv))
    ceilings()
    decode_rope(variants, rep_ms, grid)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(out_dir, f"kernels_bench_rope_{stamp}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"kernels_bench_rope_{stamp}.log"), "w") as f:
        f.write("\n".join(LOG))
    log(f"wrote {out_dir}/kernels_bench_rope_{stamp}.json / .log")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for JSON + PNG (default: $OUT, else benchmarks/results)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument("--dry", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: checks the script")
    ap.add_argument("--decode-only", action="store_true",
                    help="decode: correctness of the variants, every variant on the whole grid, tables")
    ap.add_argument("--variants", default="",
                    help=f"comma-separated decode variants for --decode-only (default: {','.join(V5_DEFAULT)}; "
                         f"also {','.join(V3_VARIANTS)})")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench time per measurement in --decode-only")
    ap.add_argument("--no-warm", action="store_true", help="--decode-only: no parallel pre-compilation")
    ap.add_argument("--warm", default="", help=argparse.SUPPRESS)  # internal: subprocess of the warm-up
    ap.add_argument("--grid", default="",
                    help="--decode-only shapes as bits:ctx:B,... (default: 1 and 0.375 bit x 8K/32K/128K x B=1/8/32)")
    ap.add_argument("--rope", action="store_true",
                    help="--decode-only: the pre-RoPE pair-layout decode (kernels/rope_decode.py): correctness, then "
                         "its variants beside SDPA and the post-RoPE Triton loop (1 bit, 128K B=1/8/32, 32K "
                         "B=128; --variants picks from " + ",".join(ROPE_VARIANTS) + ")")
    a = ap.parse_args()
    if a.warm:
        name, shapes = json.loads(a.warm)
        return warm_variant(name, shapes)
    if a.dry:
        global DRY, DEV, HQ, HKV, D
        DRY, DEV, HQ, HKV, D = True, "cpu", 4, 2, 32
    out_dir = a.out or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    global PARTIAL
    PARTIAL = os.path.join(out_dir, "kernels_bench_partial.json")
    if a.decode_only and a.rope:
        names = [n for n in a.variants.split(",") if n]
        unknown = [n for n in names if n not in ROPE_VARIANTS]
        if unknown:
            raise SystemExit(f"unknown rope variants {unknown}; known: {list(ROPE_VARIANTS)}")
        grid = [(x.split(":")[0], int(x.split(":")[1]), int(x.split(":")[2])) for x in a.grid.split(",") if x]
        return main_decode_rope(out_dir, names or None, a.rep_ms, grid or None)
    if a.decode_only:
        names = [n for n in a.variants.split(",") if n]
        unknown = [n for n in names if n not in ALL_VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {list(ALL_VARIANTS)}")
        grid = [(x.split(":")[0], int(x.split(":")[1]), int(x.split(":")[2])) for x in a.grid.split(",") if x]
        return main_decode_only(out_dir, names or None, a.rep_ms, grid or None, warm=not a.no_warm)
    only = set(filter(None, a.only.split(",")))
    want = lambda n: not only or n in only  # noqa: E731
    env(" ".join(["python"] + sys.argv))
    ceilings()
    for name, fn in (("correct_encode", correct_encode), ("correct_prefill", correct_prefill),
                     ("correct_decode", correct_decode), ("opcheck_cuda", opcheck_cuda)):
        if want("correct") or (only and name in only):
            fn()
    base = {"block_n": 64, "num_warps": 4, "num_stages": 1, "gather_cache": ".ca", "cent": "fp16"}
    best = {k: dict(base) for k in ("1", "0.375", "1_fp16", "0.375_fp16")}
    if want("micro"):
        micro()
    if want("decode"):
        best = decode_sweep(a.quick) or best
        breakdown(best)
        decode_table(best, a.quick)
    if want("prefill"):
        prefill(a.quick)
    if want("flush"):
        flush_timing()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(out_dir, f"kernels_bench_{stamp}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    try:
        plot(os.path.join(out_dir, f"kernels_bench_{stamp}.png"))
    except Exception as exc:  # noqa: BLE001
        log("plot failed", exc)
    with open(os.path.join(out_dir, f"kernels_bench_{stamp}.log"), "w") as f:
        f.write("\n".join(LOG))
    print("\n" + table())


if __name__ == "__main__":
    main()
