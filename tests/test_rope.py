import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antkv_compile.models import tiny_model
from antkv_compile.numerics.rope import RopeTable, rotate, unrotate


@settings(max_examples=20, deadline=None)
@given(start=st.integers(0, 5000), n=st.integers(1, 9), seed=st.integers(0, 99))
def test_unrotate_inverts_the_models_own_rope(start, n, seed):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _model()
    table = RopeTable.from_model(model)
    pos = torch.arange(start, start + n)
    cos, sin = table(pos)
    k = torch.randn(1, 2, n, table.head_dim, generator=torch.Generator().manual_seed(seed))
    q = torch.zeros_like(k)
    _, hf = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(rotate(k, cos, sin), hf)
    torch.testing.assert_close(unrotate(hf, cos, sin), k, atol=1e-5, rtol=1e-5)


_cache = {}


def _model():
    if "m" not in _cache:
        _cache["m"] = tiny_model("llama")
    return _cache["m"]
