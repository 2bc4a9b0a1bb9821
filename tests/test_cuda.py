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
    if bits == "1":  # 2 copies of the value table: the store keeps the selection words of every written group
        from antkv_compile.kernels.value_copies import select_reference

        n8 = ker.n_coded // 8 * 8
        assert ker.value_sel is not None and ker._sel_mode in (1, 2)
        assert torch.equal(ker.value_sel[:, :, :n8], select_reference(ker.codes_v[:, :, :n8], ker._sel_mode))
    else:  # 8 copies: no selection
        assert ker.value_sel is None


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
@pytest.mark.parametrize("g", [4, 3])
def test_cuda_coded_decode_matches_reference(bits, cent_dtype, g):
    """coded="cuda" (coded_decode.cu) against the decode reference: per-sequence lengths (0, short, long),
    anchors, GQA 4 and 3, every centroid dtype, NaN-poisoned partials, and two CUDA-graph replays."""
    from antkv_compile.kernels import decode_attention as DA

    dev = torch.device("cuda", torch.cuda.current_device())
    args = _decode_case(bits, g, cent_dtype, [5000, 0, 37, 1500], dev)
    ref_o, ref_l = DA.decode_attention_reference(*args)
    plan = DA.DecodePlan(*args, coded="cuda", poison=True)
    assert plan.cuda_coded is not None
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
    tri_o, _ = DA.decode_attention_triton(*args, coded="triton")
    assert _rel(out, tri_o) < 3e-3  # the two coded paths agree with each other too


def test_cuda_coded_decode_refuses_what_it_cannot_run():
    from antkv_compile.kernels import decode_attention as DA

    dev = torch.device("cuda", torch.cuda.current_device())
    args = _decode_case("1", 8, torch.float16, [300], dev)  # G = 8 rows per KV head: more than the kernel packs
    with pytest.raises(ValueError, match="query rows"):
        DA.DecodePlan(*args, coded="cuda")
    assert DA.DecodePlan(*args, coded="auto").cuda_coded is None  # auto falls back to the Triton loop


def test_cuda_coded_decode_matches_reference_and_the_triton_loop():
    """The warp kernel of coded_decode.cu at both presets (2 copies of the value table at 1 bit, 8 at 0.375 bit),
    against the reference and the Triton coded loop; its fp16 key table rounds the logits (~2^-12 per entry)."""
    from antkv_compile.kernels import decode_attention as DA

    dev = torch.device("cuda", torch.cuda.current_device())
    for bits, copies in (("1", 2), ("0.375", 8)):
        args = _decode_case(bits, 4, torch.float16, [9000, 700], dev, seed=3)
        ref, _ = DA.decode_attention_reference(*args)
        plan = DA.DecodePlan(*args, coded="cuda")
        assert plan.cuda_coded.copies == copies
        out, _ = plan()
        tri, _ = DA.DecodePlan(*args, coded="triton")()
        assert _rel(out, ref) < 3e-3 and _rel(tri, ref) < 3e-3
        assert 0 < _rel(out, tri) < 2e-3


def test_cuda_value_copy_selection_changes_no_bits():
    """v8: the selection words only choose which copy of the value table a row is read from, so any words (the
    selected ones, random ones, none) give the same bits; malformed words are refused."""
    from antkv_compile.kernels import decode_attention as DA
    from antkv_compile.kernels.value_copies import selection_words

    dev = torch.device("cuda", torch.cuda.current_device())
    args = _decode_case("1", 4, torch.float16, [9000, 0, 37, 1500], dev, seed=5)
    codes_v = args[2]
    ref, _ = DA.decode_attention_reference(*args)
    base, _ = DA.DecodePlan(*args, coded="cuda")()
    assert _rel(base, ref) < 3e-3
    rnd = torch.randint(-2**15, 2**15, tuple(codes_v.shape[:3]), dtype=torch.int16, device=dev)
    sel = selection_words(codes_v)
    for words in (sel, rnd):
        plan = DA.DecodePlan(*args, coded="cuda", value_sel=words)
        assert plan.cuda_coded.value_sel == 2
        assert torch.equal(plan()[0], base)
    with pytest.raises(ValueError, match="value_sel"):
        DA.DecodePlan(*args, coded="cuda", value_sel=sel[:, :, 1:])


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
@pytest.mark.parametrize("trig", ["libdevice", "tile", "fast"])
def test_rope_decode_at_128k_slots_matches_reference(dtype, trig):
    """The pre-RoPE kernel against its reference with slots up to 131K (angles up to 131K rad on pair 0: the range
    reduction of cos / sin), Llama-3 RoPE (theta 500000), G = 4, 1 bit; anchors masked. "tile" factors the angle per
    tile (exact to HF's fp32 rounding); "fast" (tl.cos / tl.sin) is a benchmark alternative: this test says whether
    it is accurate enough."""
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
    out, lse = RD.rope_decode_triton(*args, rope_trig=trig, poison=True)
    ref_out, ref_lse = RD.rope_decode_reference(*args)
    err = _rel(out, ref_out)
    print(f"rope decode 128K {dtype} {trig}: relative error {err:.2e}, lse {_rel(lse, ref_lse):.2e}")
    assert err < 1e-2 and _rel(lse, ref_lse) < 2e-3


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
    assert ker._graph is not None and ker.value_sel is None
