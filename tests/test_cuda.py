"""On a CUDA device only (skipped elsewhere): the compiled model's GPU path against the reference path.

Run on the GPU machine with ``python -m pytest -q tests/test_cuda.py``. Bounds: bf16/fp16 storage with fp32
accumulation in both paths; the kernels gather fp16 centroids, so outputs agree to ~1e-2 relative
(measured ~1e-3 for the decode kernel alone, kernels/NOTES.md).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from antkv_compile.config import AnTKVConfig  # noqa: E402
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry  # noqa: E402
from antkv_compile.numerics.vq import random_codebook  # noqa: E402


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("bits", ["1", "0.375"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_store_matches_reference_store_on_cuda(bits, dtype):
    from antkv_compile.runtime.kernel_store import KernelLayerStore

    dev = torch.device("cuda", torch.cuda.current_device())
    b, hkv, g, d = 2, 8, 4, 128
    cfg = AnTKVConfig(bits=bits, anchor_ratio=0.01, window=64)
    gen = torch.Generator().manual_seed(0)
    cbk = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    cbv = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    geom = StoreGeometry(b, hkv, d, 2048, dtype, dev, scale=d ** -0.5)
    ref = AnTKVLayerStore(geom, cbk, cbv, cfg)
    ker = KernelLayerStore(geom, cbk, cbv, cfg)
    torch.manual_seed(1)
    n = 1300
    q = torch.randn(b, hkv * g, n, d, device=dev, dtype=dtype)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    spans = [(0, 700), (700, 1200)] + [(t, t + 1) for t in range(1200, n)]
    worst = 0.0
    for lo, hi in spans:
        o_ref = ref.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        o_ker = ker.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        worst = max(worst, _rel(o_ker, o_ref))
    print(f"bits {bits} {dtype}: worst relative error {worst:.2e}, coded {ker.n_coded}, anchors {ker.num_anchors}")
    assert ker.n_coded == ref.n_coded and ker.num_anchors == ref.num_anchors
    assert worst < 2e-2
    assert ker._graph is not None  # the decode steps were replayed from the store's CUDA graph


def test_compiled_tiny_llama_kernels_equal_reference_on_cuda():
    from transformers import StaticCache

    from antkv_compile.backend import antkv_backend
    from antkv_compile.models import tiny_model

    from test_backend import random_artifact

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    art = random_artifact(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 90), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    logits = {}
    for store in ("reference", "kernels"):
        torch._dynamo.reset()
        fn = torch.compile(model, backend=antkv_backend, options={"store": store, "window": 16, "anchor_ratio": 0.05,
                                                                  "artifact": art})
        cache = StaticCache(config=model.config, max_cache_len=160)
        out, seq = [], []
        with torch.no_grad():
            o = fn(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(40):
                nxt = o.logits[:, -1:].argmax(-1) if store == "reference" else None
                seq.append(nxt) if nxt is not None else None
                out.append(o.logits[:, -1].float())
                o = fn(input_ids=nxt if nxt is not None else logits["tokens"][len(out) - 1], past_key_values=cache,
                       use_cache=True)
        logits[store] = torch.stack(out)
        if store == "reference":
            logits["tokens"] = seq
    rel = _rel(logits["kernels"], logits["reference"])
    print(f"tiny llama bf16 compiled, kernels vs reference store: relative logit error {rel:.2e}")
    assert rel < 2e-2


def _decode_case(bits, g, cent_dtype, n_coded, dev, seed=0, d=128, hkv=2, window=16, dtype=torch.float16):
    """Store buffers of len(n_coded) sequences with per-sequence coded lengths (0 allowed), 1 % anchors."""
    from antkv_compile.kernels import decode_attention as DA
    from antkv_compile.config import get_preset

    gen = torch.Generator().manual_seed(seed)
    p = get_preset(bits)
    b, cap = len(n_coded), max(max(n_coded), 64)
    s = d // p.sub_dim

    def book():
        cent = torch.randn(p.stages, hkv, s, p.num_centroids, p.sub_dim, generator=gen).to(cent_dtype)
        inv = torch.linalg.inv(torch.randn(hkv, d, d, generator=gen) / d ** 0.5 + 2 * torch.eye(d))
        return cent.to(dev), inv.to(dev), (0.1 * torch.randn(hkv, d, generator=gen)).to(dev)

    (ck_, ik, mk), (cv_, iv, mv) = book(), book()
    codes = lambda: torch.randint(0, p.num_centroids, (b, hkv, cap, s * p.stages), generator=gen,  # noqa: E731
                                  dtype=torch.uint8).to(dev)
    a = max(1, cap // 100)
    pos = torch.stack([torch.stack([torch.randperm(max(n, 1), generator=gen)[:a] for _ in range(hkv)])
                       if n >= a else torch.full((hkv, a), -1) for n in n_coded]).to(torch.int32).to(dev)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dtype)  # noqa: E731
    nc = torch.tensor(n_coded, dtype=torch.int32, device=dev)
    wl = torch.full((b,), 5, dtype=torch.int32, device=dev)
    return [rnd(b, hkv * g, 1, d), codes(), codes(), DA.bits_from_positions(pos, cap), nc, rnd(b, hkv, a, d),
            rnd(b, hkv, a, d), pos, rnd(b, hkv, window, d), rnd(b, hkv, window, d), wl, ck_, ik, mk, cv_, iv, mv,
            d ** -0.5]


@pytest.mark.parametrize("bits", ["1", "0.375"])
@pytest.mark.parametrize("cent_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g", [4, 3, 16])
def test_cuda_post_rope_decode_matches_reference(bits, cent_dtype, g):
    """The post-RoPE Triton decode (the key-LUT loop at G 4 / 3, the dequantized tensor-core loop at G 16) against
    the decode reference: per-sequence lengths (0, short, long), anchors, every centroid dtype, NaN-poisoned
    partials, and two CUDA-graph replays."""
    from antkv_compile.kernels import decode_attention as DA

    dev = torch.device("cuda", torch.cuda.current_device())
    args = _decode_case(bits, g, cent_dtype, [5000, 0, 37, 1500], dev)
    ref_o, ref_l = DA.decode_attention_reference(*args)
    plan = DA.DecodePlan(*args, poison=True)
    out, lse = plan()
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any()
    assert _rel(out, ref_o) < 3e-3 and _rel(lse, ref_l) < 1e-4, (_rel(out, ref_o), _rel(lse, ref_l))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan()
    plan.out.fill_(float("nan"))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(plan.out, ref_o) < 3e-3


def test_kernel_store_decode_graph_replays_the_direct_launches(monkeypatch):
    """v8: a store's decode steps replayed from its CUDA graph give the bits of the direct launches, across window
    flushes (anchors and codes written in place) and a long chunk that reallocates the window (captured again)."""
    from antkv_compile.runtime import kernel_store as KS

    dev = torch.device("cuda", torch.cuda.current_device())
    b, hkv, g, d, dtype = 2, 8, 4, 128, torch.bfloat16
    cfg = AnTKVConfig(bits="1", anchor_ratio=0.01, window=64)
    gen = torch.Generator().manual_seed(0)
    cbk = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    cbv = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    geom = StoreGeometry(b, hkv, d, 1024, dtype, dev, scale=d ** -0.5)
    graphed, direct = KS.KernelLayerStore(geom, cbk, cbv, cfg), KS.KernelLayerStore(geom, cbk, cbv, cfg)
    torch.manual_seed(2)
    n = 600
    q = torch.randn(b, hkv * g, n, d, device=dev, dtype=dtype)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    spans = [(0, 300)] + [(t, t + 1) for t in range(300, 400)] + [(400, 500)] + [(t, t + 1) for t in range(500, n)]
    captures = set()
    for lo, hi in spans:
        args = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        monkeypatch.setattr(KS, "_GRAPHS", True)
        o_g = graphed.attend(*args)
        if graphed._graph is not None:
            captures.add(id(graphed._graph[1]))
        monkeypatch.setattr(KS, "_GRAPHS", False)
        o_d = direct.attend(*args)
        assert torch.equal(o_g, o_d), (lo, hi)
    assert len(captures) >= 2  # the 100-token chunk moved the window's buffers: a second capture


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride,band", [(4, 256), (8, 128), (3, 1), (1, 256)])
@pytest.mark.parametrize("d", [128, 64, 256])
def test_row_sampled_anchor_scores_match_reference_on_cuda(dtype, stride, band, d):
    """The score kernel (exact, and with rows sampled beyond the band) at a prefill-sized window with the
    benchmark's heads and the default tile sizes, against the reference (sampled: visibly different from the
    exact scores)."""
    from antkv_compile.kernels import prefill_attention as PA

    torch.manual_seed(3)
    dev = torch.device("cuda", torch.cuda.current_device())
    t = 3000
    q = torch.randn(1, 32, t, d, device=dev, dtype=dtype)
    k, v = (torch.randn(1, 8, t, d, device=dev, dtype=dtype) for _ in range(2))
    dk, dv = (0.3 * torch.randn(1, 8, t, d, device=dev) for _ in range(2))
    out, lse, exact = PA.prefill_attention_ans_reference(q, k, v, dk, dv, d**-0.5)
    ref = PA.anchor_scores_reference(q, k, v, dk, dv, out, lse, d**-0.5, stride, band)
    got = PA.anchor_scores_triton(q, k, v, dk, dv, out.to(dtype), lse, d**-0.5, row_stride=stride, band=band)
    assert _rel(got, ref) < 1e-2
    if stride > 1:
        assert _rel(ref, exact) > 1e-3


# ------------------------------------------------------------------------------------- pre-RoPE pair-layout keys
def _pair_codebook(hkv, d, bits, seed):
    from antkv_compile.numerics.rope_pairs import pair_transform
    from antkv_compile.numerics.vq import Codebook

    g = torch.Generator().manual_seed(seed)
    tr, inv = pair_transform(torch.stack([torch.randperm(d // 2, generator=g) for _ in range(hkv)]))
    p = AnTKVConfig(bits=bits).preset
    cents = 0.5 * torch.randn(1, hkv, d // p.sub_dim, p.num_centroids, p.sub_dim, generator=g)
    return Codebook(cents, tr, inv, 0.2 * torch.randn(hkv, d, generator=g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_rope_decode_at_128k_slots_matches_reference(dtype, impl):
    """The pre-RoPE kernel against its reference with slots up to 131K (angles up to 131K rad on pair 0: the range
    reduction of cos / sin), Llama-3 RoPE (theta 500000), G = 4, 1 bit; anchors masked. "cuda": the CUDA C++ kernel
    (rope_decode.cu, the default where it runs: angle factored per 8-token group, fl(T w) + fl(d w), within 1 ulp of
    HF's fl(p w); fp16x2 rotation); "triton": the Triton kernel (libdevice cos / sin of fl(p w))."""
    from antkv_compile.kernels import decode_attention as DA
    from antkv_compile.kernels import rope_decode as RD
    from antkv_compile.numerics.vq import random_codebook

    dev = torch.device("cuda", torch.cuda.current_device())
    b, hkv, g, d, n = 1, 2, 4, 128, 131072
    cbk = _pair_codebook(hkv, d, "1", 0)
    cbv = random_codebook(AnTKVConfig(bits="1").preset, hkv, d, generator=torch.Generator().manual_seed(1), scale=0.5)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d)
    table, pairs, freq = RD.rope_key_tables(cbk, inv_freq, torch.float16, dev)
    torch.manual_seed(2)
    q = torch.randn(b, hkv * g, 1, d, device=dev, dtype=dtype)
    ck = torch.randint(0, 256, (b, hkv, n, 16), device=dev, dtype=torch.uint8)
    cv = torch.randint(0, 256, (b, hkv, n, 16), device=dev, dtype=torch.uint8)
    pos = torch.randint(0, n, (b, hkv, 1311), device=dev, dtype=torch.int32)
    ak, av = (torch.randn(b, hkv, 1311, d, device=dev, dtype=dtype) for _ in range(2))
    wk, wv = (torch.randn(b, hkv, 64, d, device=dev, dtype=dtype) for _ in range(2))
    args = (q, ck, cv, DA.bits_from_positions(pos, n), torch.full((b,), n, dtype=torch.int32, device=dev), ak, av,
            pos, wk, wv, torch.full((b,), 33, dtype=torch.int32, device=dev), table, pairs, freq,
            cbv.centroids.to(dev, torch.float16), cbv.inverse.to(dev), cbv.mean.to(dev), d ** -0.5, 1.0)
    out, lse = RD.rope_decode_triton(*args, rope_impl=impl, poison=True)
    if impl == "cuda":
        assert type(DA.LAST_LAUNCH["rope_coded"]).__name__ == "RopeDecodeCuda"
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    err = _rel(out, ref_out)
    print(f"rope decode 128K {dtype} {impl}: relative error {err:.2e}, lse {_rel(lse, ref_lse):.2e}")
    assert err < 1e-2 and _rel(lse, ref_lse) < 2e-3
    if impl == "cuda":  # as close to the reference as the Triton kernel (same fp16 key products; the
        # factored angle adds <= 1 ulp of the angle: ~2.7e-3 logit units at most, benchmarks/rope_rotation_emulate.py)
        assert err < 6e-3 and _rel(lse, ref_lse) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pre_rope_kernel_store_matches_reference_store_on_cuda(dtype):
    """A pre-RoPE pair-layout store on the GPU (Triton encode + scores, the rope decode kernel, its CUDA graph) against
    the reference store: chunks over a coded prefix and decode steps across flushes."""
    from antkv_compile.numerics.rope import InvFreqRope
    from antkv_compile.numerics.vq import random_codebook
    from antkv_compile.runtime.kernel_store import KernelLayerStore

    dev = torch.device("cuda", torch.cuda.current_device())
    b, hkv, g, d = 2, 8, 4, 128
    cfg = AnTKVConfig(bits="1", anchor_ratio=0.01, window=64, key_space="pre_rope", coded_path="dequantized")
    cbk = _pair_codebook(hkv, d, "1", 3)
    cbv = random_codebook(cfg.preset, hkv, d, generator=torch.Generator().manual_seed(4), scale=0.5)
    rope = InvFreqRope(1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d))
    geom = StoreGeometry(b, hkv, d, 2048, dtype, dev, scale=d ** -0.5)
    ref = AnTKVLayerStore(geom, cbk, cbv, cfg, rope=rope)
    ker = KernelLayerStore(geom, cbk, cbv, cfg, rope=rope)
    torch.manual_seed(1)
    n = 1300
    q = torch.randn(b, hkv * g, n, d, device=dev, dtype=dtype)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
    worst = 0.0
    for lo, hi in [(0, 700), (700, 1200)] + [(t, t + 1) for t in range(1200, n)]:
        o_ref = ref.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        o_ker = ker.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        worst = max(worst, _rel(o_ker, o_ref))
    print(f"pre-RoPE store {dtype}: worst relative error {worst:.2e}, coded {ker.n_coded}, anchors {ker.num_anchors}")
    assert ker.n_coded == ref.n_coded and ker.num_anchors == ref.num_anchors
    assert worst < 2e-2
    assert ker._graph is not None
    from antkv_compile.kernels import decode_attention as DA
    assert type(DA.LAST_LAUNCH.get("rope_coded")).__name__ == "RopeDecodeCuda"  # the store ran the CUDA kernel


# ------------------------------------------------------------------------- the CUDA C++ pre-RoPE kernel (rope_decode.cu)
@pytest.mark.parametrize("sfu", [False, True])
def test_rope_cuda_cos_sin_is_accurate_to_hf_fp32_angles(sfu):
    """The kernel's cos / sin of fl(p * w), the fp32 angle as HF computes it, against float64 cos / sin of that same
    fp32 angle: slots up to 2^20 (angles up to 1e6 rad), Llama-3 and default-theta frequencies. sfu False: Cody-Waite
    reduction + polynomials (the per-lane key factor R(fl(d w))); True: the same reduction to [-pi, pi] then
    sin.approx / cos.approx (the per-group query factor R(fl(T w)))."""
    from antkv_compile.kernels.rope_decode_cuda import cos_sin_probe

    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(0, 4096), torch.randint(0, 2 ** 17, (4096,), generator=g),
                     torch.randint(2 ** 17, 2 ** 20, (2048,), generator=g)]).float()
    w = torch.cat([1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128),
                   1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64), torch.rand(32, generator=g)])
    got = cos_sin_probe(pos.to(dev), w.to(dev), sfu=sfu).double().cpu()
    ang = (pos[:, None] * w[None, :]).double()  # the fp32 product, then exact
    err = (got - torch.stack([ang.cos(), ang.sin()], -1)).abs()
    print(f"cos/sin (sfu {sfu}) max abs error {err.max():.2e} (slots < 2^17: {err[:8192].max():.2e})")
    if sfu:  # sin.approx / cos.approx: ~2^-21 absolute on [-pi, pi]; the fp16 rounding that follows is 2.4e-4
        assert err.max() < 4e-6
    else:
        assert err[:8192].max() < 5e-7 and err.max() < 1e-6


def _rope_cuda_case(d, g, bits, dtype, seed, tq=1, lengths=(0, 37, 3000), n_cap=3000, a_cap=30, key_dt=None,
                    rope_scale=1.0):
    """rope_decode inputs (tests/test_rope_decode.py's generator) with the value codebook at the key's bits and the
    key table / value centroids in the given dtypes."""
    from numerics_helpers import codebook_with_transform
    from test_rope_decode import rope_inputs

    dev = torch.device("cuda", torch.cuda.current_device())
    args = list(rope_inputs(len(lengths), 2, g, tq, d, n_cap, a_cap, 16, bits, 1, False, dtype, seed,
                            lengths=torch.tensor(lengths), rope_scale=rope_scale))
    cbv = codebook_with_transform(bits, 2, d, seed + 7)
    gen = torch.Generator().manual_seed(seed + 8)
    args[2] = torch.randint(0, cbv.num_centroids, (len(lengths), 2, n_cap, cbv.codes_per_vector),
                            generator=gen).to(torch.uint8).to(dev)
    args[14] = cbv.centroids.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float16).to(dev)
    args[15], args[16] = cbv.inverse.to(dev), cbv.mean.to(dev)
    if key_dt is not None:
        args[11] = args[11].to(key_dt)
    return args


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [3, 4])
@pytest.mark.parametrize("bits", ["1", "0.375"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_cuda_decode_matches_reference(d, g, bits, dtype):
    """The CUDA C++ pre-RoPE kernel (rope_impl="cuda") against rope_decode_reference: head_dim 64 / 128, G 3 / 4,
    1 bit (8-dim sub-spaces) and 0.375 bit (16-dim), fp16 / bf16 queries and value centroids (fp32 key table at
    head_dim 64), sequences of 0 / 37 / 3000 coded tokens with 1 % anchors masked, NaN-poisoned partials, then two
    CUDA-graph replays of one plan."""
    from antkv_compile.kernels import decode_attention as DA
    from antkv_compile.kernels import rope_decode as RD

    args = _rope_cuda_case(d, g, bits, dtype, seed=d + g, key_dt=torch.float32 if d == 64 else None)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    out, lse = RD.rope_decode_triton(*args, rope_impl="cuda", poison=True)
    assert type(DA.LAST_LAUNCH["rope_coded"]).__name__ == "RopeDecodeCuda"
    assert not out.isnan().any() and not lse.isnan().any()
    e_out, e_lse = _rel(out, ref_out), _rel(lse, ref_lse)
    tri_out, _ = RD.rope_decode_triton(*args, rope_impl="triton", poison=True)
    print(f"rope cuda d={d} g={g} {bits} {dtype}: out {e_out:.2e} (triton {_rel(tri_out, ref_out):.2e}), "
          f"lse {e_lse:.2e}")
    assert e_out < 8e-3 and e_lse < 4e-3
    plan = DA.DecodePlan(args[0], *args[1:12], None, None, *args[14:18], rope_keys=(args[12], args[13], args[18]),
                         rope_impl="cuda")
    held = {}
    graph = torch.cuda.CUDAGraph()
    plan()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        held["o"] = plan()[0]
    for _ in range(2):
        held["o"].fill_(float("nan"))
        graph.replay()
    torch.cuda.synchronize()
    assert _rel(held["o"], ref_out) < 8e-3


def test_rope_cuda_decode_eight_rows_scaled_and_split():
    """G*Tq = 8 (G 4, Tq 2: every MMA column real), attention_scaling 0.8, explicit splits, a sequence of exactly one
    chunk boundary, and every coded token of one sequence an anchor."""
    from antkv_compile.kernels import decode_attention as DA
    from antkv_compile.kernels import rope_decode as RD

    args = _rope_cuda_case(128, 4, "1", torch.float16, seed=5, tq=2, lengths=(64, 2000), n_cap=2000, a_cap=64,
                           rope_scale=0.8)
    args[7][0] = torch.arange(64, dtype=torch.int32, device=args[7].device)  # sequence 0: all 64 coded are anchors
    args[3] = DA.bits_from_positions(args[7], 2000)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    for splits in [(1, 1), (7, 2), None]:
        out, lse = RD.rope_decode_triton(*args, rope_impl="cuda", poison=True, splits=splits)
        assert _rel(out, ref_out) < 8e-3 and _rel(lse, ref_lse) < 4e-3, splits


def test_rope_cuda_refuses_what_it_cannot_run():
    from antkv_compile.kernels import rope_decode as RD
    from antkv_compile.kernels.rope_decode_cuda import unsupported_reason

    args = _rope_cuda_case(128, 3, "1", torch.float16, seed=1, tq=3, lengths=(100,), n_cap=100, a_cap=1)
    assert "9 query rows" in unsupported_reason(args[0], args[1], args[2], args[11], args[14], args[3], args[4], 16)
    with pytest.raises(ValueError, match="cannot run"):
        RD.rope_decode_triton(*args, rope_impl="cuda")
    out, _ = RD.rope_decode_triton(*args)  # auto: the Triton kernel
    ref, _ = RD.rope_decode_reference(*args)
    assert _rel(out, ref) < 8e-3
    args = _rope_cuda_case(128, 4, "1", torch.float16, seed=1, lengths=(100,), n_cap=100, a_cap=1)
    q32 = args[0].float()
    assert "float32 queries" in unsupported_reason(q32, args[1], args[2], args[11], args[14], args[3], args[4], 16)
    assert unsupported_reason(args[0], args[1], args[2], args[11], args[14], args[3], args[4], 16) is None


# ------------------------------------------------------------------ the retrieval mode (offload="host", issue 19)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [128, 64, 6])
def test_host_gather_uva_and_staged_equal_index_select(dtype, d):
    """The zero-copy gather (kernel reading pinned host memory through its mapping) and the staged one return the
    rows index_select returns on the host, bit for bit; row width 6 x 2 bytes takes the 4-byte-word path."""
    from antkv_compile.kernels.host_gather import gather_rows_staged, gather_rows_uva

    gen = torch.Generator().manual_seed(0)
    hk = torch.randn(5000, d, generator=gen).to(dtype).pin_memory()
    hv = torch.randn(5000, d, generator=gen).to(dtype).pin_memory()
    rows = torch.randint(0, 5000, (777,), generator=gen)
    out_k = torch.empty(777, d, dtype=dtype, device="cuda")
    out_v = torch.empty_like(out_k)
    gather_rows_uva(hk, hv, rows.cuda(), out_k, out_v)
    sk, sv = gather_rows_staged(hk, hv, rows.cuda())
    torch.cuda.synchronize()
    for got in (out_k, sk):
        assert torch.equal(got.cpu(), hk.index_select(0, rows))
    for got in (out_v, sv):
        assert torch.equal(got.cpu(), hv.index_select(0, rows))


def _offload_pair(dtype, fraction, floor=16, ratio=0.01, gather="uva", cap=2048):
    from antkv_compile.numerics.retrieval import RetrievalLayerStore
    from antkv_compile.runtime.host_kv import PinnedHostKV
    from antkv_compile.runtime.offload_store import OffloadKernelStore

    dev = torch.device("cuda", torch.cuda.current_device())
    b, hkv, d = 2, 8, 128
    cfg = AnTKVConfig(bits="1", anchor_ratio=ratio, window=64, offload="host", retrieve_fraction=fraction,
                      retrieve_min=floor)
    gen = torch.Generator().manual_seed(0)
    cbk = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    cbv = random_codebook(cfg.preset, hkv, d, generator=gen, scale=0.5)
    geom = StoreGeometry(b, hkv, d, cap, dtype, dev, scale=d ** -0.5)
    ker = OffloadKernelStore(geom, cbk, cbv, cfg, host=PinnedHostKV(geom, gather=gather))
    ref = RetrievalLayerStore(geom, cbk, cbv, cfg, host=PinnedHostKV(geom, gather="staged"))
    return ref, ker


@pytest.mark.parametrize("gather", ["uva", "staged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_offload_kernel_store_on_cuda(dtype, gather):
    """k = all: exact attention over full precision; k = 2 %: the retrieval reference store (same selection up to
    near-ties); the host copy is pinned and holds every coded token; the decode replays its CUDA graph."""
    from antkv_compile.numerics.attention import exact_attention

    torch.manual_seed(1)
    n, g = 1300, 4
    q = torch.randn(2, 8 * g, n, 128, device="cuda", dtype=dtype)
    k = torch.randn(2, 8, n, 128, device="cuda", dtype=dtype)
    v = torch.randn(2, 8, n, 128, device="cuda", dtype=dtype)
    spans = [(0, 700), (700, 1200)] + [(t, t + 1) for t in range(1200, n)]
    ref, ker = _offload_pair(dtype, 1.0, gather=gather)
    worst = 0.0
    for lo, hi in spans:
        out = ker.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        if hi - lo == 1:
            exact = exact_attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], 128 ** -0.5)[0]
            worst = max(worst, _rel(out, exact))
    print(f"offload {dtype} {gather}, k = all: worst relative error against exact attention {worst:.2e}")
    assert worst < 1e-2
    nc = ker.n_coded
    assert ker.host.k.is_pinned() and torch.equal(ker.host.k[:nc].permute(1, 2, 0, 3).cuda(), k[:, :, :nc])
    assert ker._graph is not None and ker.host.gather_mode == gather
    ref, ker = _offload_pair(dtype, 0.02, gather=gather)
    worst, overlap = 0.0, []
    for lo, hi in spans:
        o_ref = ref.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        o_ker = ker.attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        worst = max(worst, _rel(o_ker, o_ref))
        if hi - lo == 1:
            a, b = ref.last_retrieved, ker.last_retrieved
            same = (a.sort(2).values[..., :, None] == b[..., None, :]).any(-1).float().mean()
            overlap.append(float(same))
    print(f"offload {dtype} {gather}, 2 %: worst relative error against the reference {worst:.2e}, "
          f"retrieved-set overlap min {min(overlap):.3f}")
    assert worst < 3e-2 and min(overlap) > 0.9


def test_compiled_tiny_llama_with_offload_on_cuda_equals_uncompiled_at_k_all():
    from transformers import StaticCache

    from antkv_compile.backend import antkv_backend, last_compiles
    from antkv_compile.models import tiny_model

    from test_backend import random_artifact

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    art = random_artifact(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 90), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def run(fn):
        cache = StaticCache(config=model.config, max_cache_len=160)
        out = []
        with torch.no_grad():
            o = fn(input_ids=ids, past_key_values=cache, use_cache=True)
            for i in range(40):
                out.append(o.logits[:, -1].float())
                o = fn(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        return torch.stack(out)

    torch._dynamo.reset()
    last_compiles.clear()
    fn = torch.compile(model, backend=antkv_backend, options={"window": 16, "anchor_ratio": 0.0, "artifact": art,
                                                              "offload": "host", "retrieve_fraction": 1.0,
                                                              "retrieve_min": 0})
    got = run(fn)
    torch._dynamo.reset()
    want = run(model)
    rel = _rel(got, want)
    session = next(r["session"] for r in last_compiles if "session" in r)
    kinds = {type(s).__name__ for s in [*session.stores.values(), *session.orphans.values()]}
    print(f"tiny llama bf16 compiled offload k = all vs uncompiled: relative logit error {rel:.2e}, stores {kinds}")
    assert kinds == {"OffloadKernelStore"}
    assert rel < 2e-2
