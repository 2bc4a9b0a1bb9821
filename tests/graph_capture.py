"""Capture the Dynamo FX graphs that a torch.compile backend receives, for tests of ``antkv_compile.patterns``.

``GraphRecorder`` is a backend that records every ``(gm, example_inputs)`` it is given and runs the graph
unchanged (``gm.forward``).  ``tiny_model`` builds a 2-layer random-weight Hugging Face model from
transformers' own config classes (hidden 64, 4 query heads, 2 key/value heads, vocab 128), and
``capture_step`` compiles one forward step of it with a ``StaticCache`` or ``DynamicCache``:

* ``step="decode"``: the prompt is run eagerly (this fills and initialises the cache), then one token
  (q_len 1) is run compiled -- what ``generate()`` compiles.  Cache tensors are graph placeholders.
* ``step="prefill"``: same eager warm-up, then ``q_len`` > 1 tokens compiled (a chunked prefill on an
  initialised cache).  Cache tensors are graph placeholders, the mask depends on ``cumulative_length``.
* ``step="prefill_fresh"``: ``q_len`` tokens compiled on an empty cache: ``StaticLayer.lazy_initialization``
  runs inside the trace, so the cache buffers are ``torch.zeros`` nodes, not placeholders.

Each capture calls ``torch._dynamo.reset()`` first so that captures of the same model class never hit the
recompile limit or reuse each other's code cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.fx as fx

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

Step = Literal["decode", "prefill", "prefill_fresh"]
CacheKind = Literal["static", "dynamic"]


class GraphRecorder:
    """A torch.compile backend that keeps the graphs it receives and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs: list[fx.GraphModule] = []
        self.example_inputs: list[list[Any]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs):  # kwargs: mode=/options= from compile
        self.graphs.append(gm)
        self.example_inputs.append(list(example_inputs))
        return gm.forward


def tiny_config(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 128,
    **overrides: Any,
):
    """A transformers config of ``family`` (one of FAMILIES) with tiny sizes; ``overrides`` go to the config."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma3": transformers.Gemma3TextConfig,
        "gemma2": transformers.Gemma2Config,  # eager attention with logit soft-capping
        "phi3": transformers.Phi3Config,
    }
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if family in ("gemma2", "gemma3"):
        # alternate sliding / global layers; a window shorter than the caches used below
        kwargs.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                      + ["sliding_attention"] * (num_layers % 2))
    kwargs.update(overrides)
    config = classes[family](**kwargs)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(family: str, *, attn_implementation: str = "sdpa", seed: int = 0, **config_kwargs: Any):
    """A random-weight causal LM of ``family``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, attn_implementation=attn_implementation, **config_kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


@dataclasses.dataclass
class CapturedStep:
    gm: fx.GraphModule
    example_inputs: list[Any]
    graphs: list[fx.GraphModule]  # all graphs (more than one only when fullgraph=False broke the graph)
    model: Any
    cache: Any
    q_len: int


def make_cache(model, kind: CacheKind, max_cache_len: int = 32):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"unknown cache kind {kind!r}")


def capture_step(
    model,
    *,
    step: Step = "decode",
    cache: CacheKind = "static",
    prompt_len: int = 5,
    q_len: int | None = None,
    max_cache_len: int = 32,
    batch: int = 1,
    fullgraph: bool = True,
) -> CapturedStep:
    """Compile one forward step of ``model`` with a recording backend and return the graph it produced."""
    if q_len is None:
        q_len = 1 if step == "decode" else 3
    if step == "decode" and q_len != 1:
        raise ValueError("decode step has q_len 1")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, vocab, (batch, prompt_len), generator=gen).to(model.device)
    new = torch.randint(1, vocab, (batch, q_len), generator=gen).to(model.device)
    past = make_cache(model, cache, max_cache_len)
    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=fullgraph)
    with torch.no_grad():
        if step != "prefill_fresh":
            model(input_ids=prompt, past_key_values=past, use_cache=True)
        compiled(input_ids=new, past_key_values=past, use_cache=True)
    if not recorder.graphs:
        raise RuntimeError("the recording backend received no graph")
    return CapturedStep(
        gm=recorder.graphs[0],
        example_inputs=recorder.example_inputs[0],
        graphs=recorder.graphs,
        model=model,
        cache=past,
        q_len=q_len,
    )


# ---------------------------------------------------------------------------------------------------------
# caches and modules that produce the other catalogued shapes


def make_setitem_cache(model, max_cache_len: int = 32):
    """A transformers ``StaticCache`` whose layers take ``StaticLayer.update``'s own fallback branch
    (``keys[:, :, cache_position] = key_states``, used on MPS / when ``index_copy_`` raises
    ``NotImplementedError``).  Only ``update`` is replaced; allocation and counters are transformers'."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class SetitemStaticLayer(StaticLayer):
        _layer_type = None  # keep transformers' STATIC_LAYER_TYPE_MAPPING untouched

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            kv_length = key_states.shape[-2]
            cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
            self.cumulative_length.add_(kv_length)
            self.keys[:, :, cache_position] = key_states
            self.values[:, :, cache_position] = value_states
            return self.keys, self.values

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for layer in cache.layers:
        assert type(layer) is StaticLayer, type(layer)
        layer.__class__ = SetitemStaticLayer
    return cache


def capture_with_cache(model, cache, *, prompt_len: int = 5, q_len: int = 1) -> CapturedStep:
    """Like ``capture_step(step="decode"/"prefill")`` but with a caller-built cache."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (1, prompt_len), generator=gen)
    new = torch.randint(1, vocab, (1, q_len), generator=gen)
    torch._dynamo.reset()
    recorder = GraphRecorder()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        torch.compile(model, backend=recorder, fullgraph=True)(input_ids=new, past_key_values=cache, use_cache=True)
    return CapturedStep(recorder.graphs[0], recorder.example_inputs[0], recorder.graphs, model, cache, q_len)


class Legacy45Layer:
    """Mimics a transformers 4.5x static cache layer: fixed buffers, *no* position counter -- the model
    supplies ``cache_position`` through ``cache_kwargs`` (``StaticLayer.update(k, v, cache_kwargs)``)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int):
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim)
        self.values = torch.zeros(batch, kv_heads, max_len, head_dim)
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)

    def update(self, key_states, value_states, cache_kwargs):
        cache_position = cache_kwargs.get("cache_position")
        self.keys.index_copy_(2, cache_position, key_states)
        self.values.index_copy_(2, cache_position, value_states)
        return self.keys, self.values


class Legacy45Cache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int):
        self.layers = [Legacy45Layer(batch, kv_heads, max_len, head_dim) for _ in range(num_layers)]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)


class Legacy45Model(torch.nn.Module):
    """A hand-written stand-in for a transformers 4.5x decoder (not a transformers model): per layer
    q/k/v projections, ``past_key_values.update(k, v, i, {"cache_position": cache_position})``, HF's
    ``repeat_kv``, a 4-D mask sliced to the key length (``mask[:, :, :, :L]``, the 4.5x sdpa idiom) and
    ``F.scaled_dot_product_attention``.  ``read_before_write=True`` attends over the cache *before* writing
    the new token (a bug shape that must be reported, not matched)."""

    def __init__(self, num_layers=2, hidden=64, heads=4, kv_heads=2, read_before_write=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.read_before_write = read_before_write
        self.q = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(num_layers))
        self.k = torch.nn.ModuleList(torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
                                     for _ in range(num_layers))
        self.v = torch.nn.ModuleList(torch.nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
                                     for _ in range(num_layers))
        self.o = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(num_layers))

    @staticmethod
    def repeat_kv(x, n_rep):
        b, h, s, d = x.shape
        if n_rep == 1:
            return x
        return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    def forward(self, x, past_key_values, cache_position, attention_mask):
        b, s, _ = x.shape
        for i in range(len(self.q)):
            q = self.q[i](x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self.k[i](x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.v[i](x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.read_before_write:
                layer = past_key_values.layers[i]
                keys, values = layer.keys, layer.values
                n = self.heads // self.kv_heads
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, self.repeat_kv(keys, n), self.repeat_kv(values, n),
                    attn_mask=attention_mask[:, :, :, : keys.shape[-2]], scale=self.head_dim**-0.5)
                past_key_values.update(k, v, i, {"cache_position": cache_position})
            else:
                keys, values = past_key_values.update(k, v, i, {"cache_position": cache_position})
                n = self.heads // self.kv_heads
                keys, values = self.repeat_kv(keys, n), self.repeat_kv(values, n)
                causal_mask = attention_mask[:, :, :, : keys.shape[-2]]
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, keys, values, attn_mask=causal_mask, dropout_p=0.0, scale=self.head_dim**-0.5)
            x = x + self.o[i](out.transpose(1, 2).reshape(b, s, -1))
        return x


def capture_legacy45(*, read_before_write: bool = False, max_len: int = 16, pos: int = 4) -> CapturedStep:
    model = Legacy45Model(read_before_write=read_before_write).eval()
    cache = Legacy45Cache(len(model.q), 1, model.kv_heads, max_len, model.head_dim)
    x = torch.randn(1, 1, 64)
    cache_position = torch.tensor([pos])
    mask = (torch.arange(max_len + 4) <= pos)[None, None, None, :]  # longer than the cache: sliced in-graph
    torch._dynamo.reset()
    recorder = GraphRecorder()
    with torch.no_grad():
        torch.compile(model, backend=recorder, fullgraph=True)(
            x, past_key_values=cache, cache_position=cache_position, attention_mask=mask)
    return CapturedStep(recorder.graphs[0], recorder.example_inputs[0], recorder.graphs, model, cache, 1)


def capture_module(module: torch.nn.Module, *args, **kwargs) -> fx.GraphModule:
    """Dynamo graph of ``module(*args, **kwargs)`` (fullgraph), through the recording backend."""
    torch._dynamo.reset()
    recorder = GraphRecorder()
    with torch.no_grad():
        torch.compile(module, backend=recorder, fullgraph=True)(*args, **kwargs)
    return recorder.graphs[0]
