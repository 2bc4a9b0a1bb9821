"""Real text that every machine already has, nothing downloaded.

Calibration and evaluation use *different* documents:

* :func:`calibration_text`: Python's documentation topics (``pydoc_data.topics``, what ``help()`` shows).
* :func:`evaluation_text`: the license texts in ``/usr/share/common-licenses/`` (GPL, LGPL, Apache, MPL, ...). If
  that folder is missing, Python's own ``LICENSE.txt`` is used instead.

:func:`token_contexts` cuts a text into equal-length token contexts for calibration or perplexity.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import torch

__all__ = [
    "LICENSES_DIR",
    "MIN_TEXT_CHARS",
    "TEXT_NAMES",
    "calibration_text",
    "evaluation_text",
    "load_text",
    "python_license_path",
    "token_contexts",
]

LICENSES_DIR = Path("/usr/share/common-licenses")
MIN_LICENSE_FILE_BYTES = 2048  # skip tiny license files (e.g. the 1.5 kB BSD notice)
MIN_TEXT_CHARS = 8000  # less than this is too little to calibrate or evaluate on

TEXT_NAMES = {
    "calibration": "calibration",
    "pydoc": "calibration",
    "evaluation": "evaluation",
    "licenses": "evaluation",
}


def calibration_text() -> str:
    """Python's ``pydoc_data.topics`` documentation: every topic, in sorted key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def python_license_path() -> Path | None:
    """Python's own ``LICENSE.txt`` (in the stdlib folder or under ``sys.base_prefix``), or None if not found."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",
        Path(os.__file__).resolve().parent / "LICENSE.txt",
        Path(sys.base_prefix) / "LICENSE.txt",
        Path(sys.base_prefix) / "lib" / version / "LICENSE.txt",
        Path(sys.base_prefix) / "Lib" / "LICENSE.txt",
        Path(sys.prefix) / "LICENSE.txt",
    ]
    for path in candidates:
        if path.is_file():
            return path
    return None


def _license_files(licenses_dir: Path) -> list[Path]:
    seen: set[str] = set()
    files = []
    for path in sorted(licenses_dir.iterdir(), key=lambda p: p.name):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        if os.path.getsize(real) >= MIN_LICENSE_FILE_BYTES:
            files.append(path)
    return files


def evaluation_text(licenses_dir: str | os.PathLike | None = None, min_chars: int = MIN_TEXT_CHARS) -> str:
    """The license texts in ``licenses_dir`` (default ``/usr/share/common-licenses``).

    Symlinks are counted once (by real path), files are joined in sorted name order, and files under 2 kB are
    skipped. If the folder is missing or yields fewer than ``min_chars`` characters, Python's ``LICENSE.txt`` is used
    instead. Raises ``RuntimeError`` if neither gives ``min_chars`` characters.
    """
    licenses_dir = Path(licenses_dir) if licenses_dir is not None else LICENSES_DIR
    tried = []
    if licenses_dir.is_dir():
        parts = []
        for path in _license_files(licenses_dir):
            try:
                parts.append(path.read_text(encoding="utf-8").strip())
            except UnicodeDecodeError:
                continue
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            return text
        tried.append(f"{licenses_dir} ({len(text)} characters)")
    else:
        tried.append(f"{licenses_dir} (missing)")
    fallback = python_license_path()
    if fallback is not None:
        text = fallback.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= min_chars:
            return text
        tried.append(f"{fallback} ({len(text)} characters)")
    else:
        tried.append("Python's LICENSE.txt (not found)")
    raise RuntimeError(
        f"No evaluation text of at least {min_chars} characters on this machine; tried: {'; '.join(tried)}. "
        "Pass a text file instead, e.g. load_text('/path/to/file.txt')."
    )


def load_text(spec: str | os.PathLike) -> str:
    """A text by name ("calibration"/"pydoc", "evaluation"/"licenses") or from a path to a UTF-8 file."""
    name = TEXT_NAMES.get(str(spec).strip().lower())
    if name == "calibration":
        return calibration_text()
    if name == "evaluation":
        return evaluation_text()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No text {str(spec)!r}: it is neither one of the names {sorted(TEXT_NAMES)} nor an existing file"
        )
    if not path.is_file():
        raise IsADirectoryError(f"Text path {path} is not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"Text file {path} is not valid UTF-8 ({exc})") from None


def token_contexts(
    tokenizer,
    text: str,
    context_len: int,
    num_contexts: int | None = None,
    bos: bool = True,
) -> torch.LongTensor:
    """Tokenizes ``text`` and cuts it into non-overlapping contexts, shape ``[n, context_len]``, dtype long.

    If ``bos`` and the tokenizer has a BOS token, each context is that BOS followed by ``context_len - 1`` text
    tokens. Otherwise it is ``context_len`` text tokens. Text tokens are never repeated across contexts. The
    leftover tail is dropped. ``num_contexts=None`` gives every full context. Asking for more than the text holds
    raises ``ValueError``, as does a text shorter than one context.
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if num_contexts is not None and num_contexts < 1:
        raise ValueError(f"num_contexts must be >= 1 or None, got {num_contexts}")
    bos_id = tokenizer.bos_token_id if bos else None
    body = context_len - (1 if bos_id is not None else 0)
    if body < 1:
        raise ValueError(f"context_len={context_len} leaves no room for text after the BOS token")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // body
    if available == 0:
        raise ValueError(
            f"The text gives only {len(ids)} tokens, fewer than one context of {context_len} tokens "
            f"({body} text tokens{' + BOS' if bos_id is not None else ''}); use a longer text or a shorter context"
        )
    n = available if num_contexts is None else num_contexts
    if n > available:
        raise ValueError(
            f"Asked for {num_contexts} contexts of {context_len} tokens, but the text ({len(ids)} tokens) holds only "
            f"{available}"
        )
    out = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), out], dim=1)
    return out
