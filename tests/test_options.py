"""Unknown ``options`` keys (neither antkv's nor Inductor's) get a clear error naming the closest antkv key."""
import pytest
import torch
from transformers import StaticCache

from antkv_compile.backend import parse_options
from antkv_compile.models import tiny_model
from antkv_compile.options import UnknownOptionError


@pytest.mark.parametrize("key, hint", [("bitz", "did you mean 'bits'?"), ("anchor_ratoi", "did you mean 'anchor_ratio'?"),
                                       ("max_autotun", "Inductor option 'max_autotune'"), ("zzz", "antkv options are")])
def test_unknown_key_named_with_closest(key, hint):
    with pytest.raises(UnknownOptionError, match=f"unknown antkv option '{key}'") as e:
        parse_options({key: 1})
    assert hint in str(e.value)


def test_inductor_keys_pass_through():
    *_, rest = parse_options({"bits": "1", "max_autotune": False, "triton.cudagraphs": False})
    assert rest == {"max_autotune": False, "triton.cudagraphs": False, "__inner": "inductor", "__allow_model_mismatch": False}


def test_unknown_key_raised_at_compile_time_not_blamed_on_inductor():
    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="antkv", options={"bitz": 1})
    with torch.no_grad(), pytest.raises(Exception) as e:
        compiled(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=StaticCache(config=model.config, max_cache_len=8))
    assert "unknown antkv option 'bitz' (did you mean 'bits'?)" in str(e.value)
    assert "torch._inductor.config" not in str(e.value).split("(did you mean")[0]


@pytest.mark.parametrize("opts, message", [
    ({"offload": "cpu"}, "offload must be None .* or 'host'"),
    ({"offload": "host", "retrieve_fraction": 1.5}, r"retrieve_fraction .* in \[0, 1\]"),
    ({"offload": "host", "retrieve_fraction": "2%"}, r"retrieve_fraction .* in \[0, 1\]"),
    ({"offload": "host", "retrieve_min": -3}, "retrieve_min .* integer >= 0"),
    ({"offload": "host", "retrieve_min": 2.5}, "retrieve_min .* integer >= 0"),
    ({"retrieve_fractoin": 0.1}, "did you mean 'retrieve_fraction'"),
])
def test_offload_options_are_checked_with_what_to_change(opts, message):
    with pytest.raises(ValueError, match=message):
        parse_options(opts)


def test_offload_options_reach_the_config():
    config, *_ = parse_options({"offload": "host", "retrieve_fraction": 0.05, "retrieve_min": 16})
    assert (config.offload, config.retrieve_fraction, config.retrieve_min) == ("host", 0.05, 16)
