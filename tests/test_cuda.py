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
