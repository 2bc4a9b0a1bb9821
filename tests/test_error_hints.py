"""Error hints match the cause: NaN/Inf in the inputs of a float32 model is not blamed on float16 overflow."""
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import StaticCache

from antkv_compile.models import tiny_model
from antkv_compile.numerics.store import CacheInputError
from antkv_compile.passes.ops import non_finite_problem


def test_nan_inputs_embeds_of_float32_model_names_the_inputs():
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="antkv", options={"inner": "eager"})
    emb = model.get_input_embeddings()(torch.tensor([[5, 6, 7, 8]])).detach()
    emb[0, 2, 3] = float("nan")
    with torch.no_grad(), _codebook_warning_ignored(), pytest.raises(CacheInputError) as e:
        compiled(inputs_embeds=emb, past_key_values=StaticCache(config=model.config, max_cache_len=8))
    msg = str(e.value)
    assert "contain NaN" in msg and "came in with the model's inputs" in msg and "inputs_embeds" in msg
    assert "float16" not in msg


@pytest.mark.parametrize("dtype, expect", [(torch.float16, "usually an overflow"), (torch.bfloat16, "came in with"),
                                           (torch.float32, "came in with")])
def test_hint_by_dtype(dtype, expect):
    k = torch.zeros(1, 1, 2, 4, dtype=dtype)
    assert non_finite_problem(0, k, k) is None
    k[0, 0, 1, 1] = float("inf")
    msg = non_finite_problem(3, k, torch.zeros_like(k))
    assert msg.startswith("layer 3: the new keys or values contain Inf") and expect in msg


@contextmanager
def _codebook_warning_ignored():
    """The backend's no-artifact warning is emitted once per process (another test may have had it first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
