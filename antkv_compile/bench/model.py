"""The model and its cache: shapes, random weights on the device, static caches, copy bandwidth."""
from __future__ import annotations

import statistics
import time

import torch


def model_config(shape: str):
    """transformers config of ``shape``: 'llama3-8b' (Llama-3-8B's shape) or 'tiny' (tiny random Llama)."""
    if shape == "llama3-8b":
        from ..planner import llama3_8b_config

        return llama3_8b_config()
    if shape == "tiny":
        from ..models import tiny_config

        return tiny_config("llama", max_position_embeddings=1 << 23)
    raise ValueError(f"unknown --shape {shape!r}: 'llama3-8b' or 'tiny'")


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight model of ``shape`` created directly on ``device`` in ``dtype`` (no slow init): matrices
    N(0, 0.02), norm weights 1."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    config = model_config(shape)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def new_cache(model, batch: int, max_len: int, device, dtype):
    """A StaticCache allocated now (``early_initialization``), so that its position counters live on the
    device before the first compiled call."""
    from transformers import StaticCache

    from ..models import kv_geometry

    g = kv_geometry(model.config)
    cache = StaticCache(config=model.config, max_cache_len=int(max_len))
    cache.early_initialization(batch_size=batch, num_heads=g.num_kv_heads, head_dim=g.head_dim, dtype=dtype,
                               device=torch.device(device))
    return cache


def set_position(cache, n: int) -> None:
    """Advance the cache's own position bookkeeping: the next forward's tokens start at position ``n``."""
    for layer in cache.layers:
        cl = layer.cumulative_length
        if isinstance(cl, torch.Tensor):
            cl.fill_(n)
        else:
            layer.cumulative_length = n
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = n


def cache_position(cache) -> int:
    return int(cache.get_seq_length())


def dense_bytes(cache) -> int:
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written over the time of one copy)."""
    cuda = device.type == "cuda"
    n = nbytes or ((1 << 30) if cuda else (1 << 24))
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
    del x, y
    return 2 * n / statistics.median(times)
