"""The compiled model runs for inference with grad mode on (Hugging Face's default outside ``generate``) and
under ``torch.inference_mode()``: the rewritten graph is compiled and run without autograd, its outputs carry
no graph, and a backward through the op itself raises one clear sentence."""
import pytest
import torch
from transformers import StaticCache

from antkv_compile.models import tiny_model


def _tokens(fn, model, ids, steps=3, cap=16):
    cache = StaticCache(config=model.config, max_cache_len=cap)
    out = fn(input_ids=ids, past_key_values=cache)
    toks = []
    for _ in range(steps):
        toks.append(int(out.logits[0, -1].argmax()))
        out = fn(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache)
    return toks, out


@pytest.mark.parametrize("grad_mode", ["enabled", "inference_mode"])
def test_compiled_model_runs_under_grad_mode_and_inference_mode(grad_mode):
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = _tokens(model, model, ids)
    compiled = torch.compile(model, backend="antkv", options={"anchor_ratio": 1.0, "window": 4})
    ctx = torch.inference_mode() if grad_mode == "inference_mode" else torch.enable_grad()
    with ctx:
        toks, out = _tokens(compiled, model, ids)
    assert toks == ref
    assert not out.logits.requires_grad  # inference only: no autograd graph through the compressed cache


def test_backward_through_the_op_raises_one_sentence():
    from antkv_compile.config import AnTKVConfig
    from antkv_compile.passes.ops import NO_BACKWARD
    from antkv_compile.runtime.state import session_for

    s = session_for(AnTKVConfig(anchor_ratio=1.0, window=4))
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    out = torch.ops.antkv_rt.cache_attend(q, k, v, torch.arange(3), None, s.sid, 0, 8, 8 ** -0.5)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no backward: the compressed KV cache is for inference only") as e:
        out.sum().backward()
    assert str(e.value) == NO_BACKWARD
