"""What the stores and the session hold: no buffer grows with capacity x head_dim beyond the codes, anchors and
anchor bitmask; ``Session.memory_bytes()`` counts every tensor the stores hold; a codebook's storage is what is
stored (a RoPE-pair map is a permutation, not a D x D matrix).

Allowances are derived here from the recipe's parameters (preset, anchor ratio, head_dim, dtype), not read from the
code under test."""
import math

import pytest
import torch

from antkv_compile.artifact import CodebookArtifact
from antkv_compile.config import AnTKVConfig, get_preset
from antkv_compile.numerics.rope import InvFreqRope
from antkv_compile.numerics.rope_pairs import pair_transform
from antkv_compile.numerics.store import AnTKVLayerStore, StoreGeometry
from antkv_compile.numerics.vq import Codebook, random_codebook
from antkv_compile.runtime.kernel_store import KernelLayerStore
from numerics_helpers import codebook_with_transform, randn

D, H, RATIO, WINDOW = 64, 2, 0.01, 8


def held_tensors(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes of this package's objects, dataclass fields, lists,
    tuples, sets and dicts (an independent walk: it does not use any accounting of the code under test)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from held_tensors(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from held_tensors(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("antkv_compile"):
        yield from held_tensors(vars(obj), seen)


def storage_bytes(*objs) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``objs``."""
    storages = {}
    for o in objs:
        for t in held_tensors(o):
            st = t.untyped_storage()
            storages[(st.data_ptr(), st.nbytes())] = st.nbytes()
    return sum(storages.values())


def pair_codebook(bits: str, heads: int, d: int, seed: int) -> Codebook:
    """A pre-RoPE key codebook in the RoPE-pair layout (random pair order per head, centroids and mean)."""
    g = torch.Generator().manual_seed(seed)
    tr, inv = pair_transform(torch.stack([torch.randperm(d // 2, generator=g) for _ in range(heads)]))
    cents = random_codebook(get_preset(bits), heads, d, generator=g).centroids
    return Codebook(cents, tr, inv, 0.3 * torch.randn(heads, d, generator=g))


def _rope(d=D):
    return InvFreqRope(1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)))


RECIPES = {  # name -> (config, key codebook maker)
    "pre_rope": (dict(key_space="pre_rope", coded_path="dequantized"), pair_codebook),
    "post_rope": (dict(), codebook_with_transform),
    "post_rope_dequantized": (dict(coded_path="dequantized"), codebook_with_transform),  # reference store only
}


def _store(kind: str, recipe: str, bits: str, capacity: int):
    cfg, key_cb = RECIPES[recipe]
    config = AnTKVConfig(bits=bits, window=WINDOW, anchor_ratio=RATIO, **cfg)
    geom = StoreGeometry(1, H, D, capacity, torch.float32, torch.device("cpu"), scale=D**-0.5)
    rope = _rope() if recipe == "pre_rope" else None
    cls = KernelLayerStore if kind == "kernels" else AnTKVLayerStore
    return cls(geom, key_cb(bits, H, D, 1), codebook_with_transform(bits, H, D, 2), config, rope=rope)


def _allowed_growth_per_kv_head(bits: str, dtype: torch.dtype, tokens: int) -> float:
    """Bytes the design lets one (sequence, KV head) grow by over ``tokens`` more tokens of capacity: one stored code
    per sub-vector and stage for K and V (a byte each: codes of <= 8 bits), ceil(ratio * tokens) + 1 anchors (K and V
    in the cache dtype, an int32 position, a float32 score) and one bit per token of the anchor bitmask (int32
    words, + 1 word of rounding)."""
    p = get_preset(bits)
    code_bytes = 2 * p.stages * (D // p.sub_dim) * math.ceil(p.code_bits / 8)
    anchors = math.ceil(RATIO * tokens) + 1
    anchor_bytes = anchors * (2 * D * torch.finfo(dtype).bits // 8 + 4 + 4)
    bitmask_bytes = 4 * (math.ceil(tokens / 32) + 1)
    return tokens * code_bytes + anchor_bytes + bitmask_bytes


@pytest.mark.parametrize("kind,recipe,bits", [
    (kind, recipe, bits) for kind in ("reference", "kernels") for recipe, bits in (
        ("pre_rope", "1"), ("pre_rope", "0.375"), ("post_rope", "1"), ("post_rope_dequantized", "1"))
    if not (kind == "kernels" and recipe == "post_rope_dequantized")])  # (the kernel store does not serve that one)
def test_no_store_grows_with_capacity_beyond_codes_anchors_and_bitmask(kind, recipe, bits):
    """The same tokens (a prefill chunk with flushes, then decode steps) through stores of 1,024 and 4,096 tokens of
    capacity: everything they hold may grow only by the codes, the anchors and the anchor bitmask. A decoded or fp32
    shadow of the capacity (N x D floats per KV head, 256 bytes per token here against 16 of codes) fails this."""
    small, large = 1024, 4096
    n, g = 80, 2
    q, k, v = randn(1, H * g, n, D, seed=1), randn(1, H, n, D, seed=2), randn(1, H, n, D, seed=3)
    held = []
    for cap in (small, large):
        s = _store(kind, recipe, bits, cap)
        s.attend(q[:, :, :72], k[:, :, :72], v[:, :, :72])  # long chunk: flushes through the chunk path
        for t in range(72, n):  # decode steps: the decode path, one more flush
            s.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert s.n_coded > 0 and type(s).__name__ == ("KernelLayerStore" if kind == "kernels" else "AnTKVLayerStore")
        held.append(storage_bytes(s))
    allowed = H * _allowed_growth_per_kv_head(bits, torch.float32, large - small)
    assert held[1] - held[0] <= allowed, (
        f"{kind}/{recipe}/{bits} bit: {held[1] - held[0]} bytes more at capacity {large} than at {small}; the design "
        f"allows {allowed:.0f}")


def _default_artifact(layers=2, bits="1") -> CodebookArtifact:
    """An artifact of the default recipe: pre-RoPE keys in the RoPE-pair layout."""
    p = get_preset(bits)
    info = {"id": "tiny", "num_layers": layers, "num_kv_heads": H, "num_q_heads": 2 * H, "head_dim": D}
    keys = [pair_codebook(bits, H, D, i) for i in range(layers)]
    values = [codebook_with_transform(bits, H, D, 10 + i) for i in range(layers)]
    manifest = {"model": info, "preset": {"name": p.name, "sub_dim": p.sub_dim, "code_bits": p.code_bits,
                                          "stages": p.stages},
                "key_space": "pre_rope", "rope": {"attention_scaling": 1.0}, "tensors_sha256": "test-memory"}
    return CodebookArtifact(keys, values, manifest, _rope().inv_freq)


@pytest.mark.parametrize("store", ["auto", "kernels"])
def test_session_memory_bytes_counts_every_tensor_its_stores_hold(store):
    """Default recipe (a pre-RoPE pair-layout artifact): the sum of ``Session.memory_bytes()`` equals, within 1 %,
    the bytes of every distinct storage reachable from the session's stores and codebooks."""
    from antkv_compile.backend import parse_options
    from antkv_compile.runtime.state import Session

    config, art, _, _ = parse_options({"artifact": _default_artifact(), "store": store, "window": WINDOW,
                                       "anchor_ratio": 0.05})
    assert config.key_space == "pre_rope"
    session = Session(9999, config, art)
    n = 60
    for layer in range(art.num_layers):
        q = randn(1, 2 * H, n, D, seed=layer)
        k, v = randn(1, H, n, D, seed=layer + 1), randn(1, H, n, D, seed=layer + 2)
        s = session.store_for(layer, q[:, :, :50], k[:, :, :50], v[:, :, :50], 0, 2048, D**-0.5)
        s.attend(q[:, :, :50], k[:, :, :50], v[:, :, :50])
        for t in range(50, n):
            s.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    kinds = {type(s).__name__ for s in session.stores.values()}
    assert kinds == {"KernelLayerStore" if store == "kernels" else "AnTKVLayerStore"}
    counted = sum(session.memory_bytes().values())
    held = storage_bytes(list(session.stores.values()), list(session.orphans.values()), session.codebooks)
    assert abs(counted - held) <= 0.01 * held, f"memory_bytes() {counted} vs held {held} bytes"


def test_pair_layout_codebook_storage_counts_the_pair_order_not_a_dense_map():
    """1 bit, head_dim 64, one head: 8 sub-spaces x 256 centroids x 8 dims, a mean of 64, and a pair order of 32
    indices (a dense map would be 64 x 64 = 4,096 numbers); a dense (post-RoPE) map still counts D x D."""
    pairs = pair_codebook("1", 1, 64, 0)
    assert pairs.storage_bits() == 16 * (8 * 256 * 8 + 64 + 32)
    assert pairs.storage_bits(element_bits=32) == 32 * (8 * 256 * 8 + 64 + 32)
    dense = codebook_with_transform("1", 1, 64, 0)
    assert dense.storage_bits() == 16 * (8 * 256 * 8 + 64 + 64 * 64)
