"""`model.compile(backend="antkv")` + `model.generate(..., cache_implementation="static")` on the CPU."""
import torch

from antkv_compile.backend import last_compiles
from antkv_compile.models import tiny_model


def test_generate_through_model_compile_equals_uncompiled_at_full_anchors():
    torch._dynamo.reset()
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = tiny_model("llama").generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    model = tiny_model("llama")
    model.compile(backend="antkv", options={"anchor_ratio": 1.0, "window": 4})
    last_compiles.clear()  # a bounded log shared by the whole session
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert out.tolist() == ref.tolist()
    new = list(last_compiles)
    assert len(new) == 2 and all(r["after"] is not None for r in new)  # prefill + decode, both rewritten
