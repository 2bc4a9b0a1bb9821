"""antkv_compile.texts: calibration / evaluation texts and token contexts."""

from __future__ import annotations

import pytest
import torch

from antkv_compile import texts
from antkv_compile.models import tiny_tokenizer


@pytest.fixture(scope="module")
def cal():
    return texts.calibration_text()


@pytest.fixture(scope="module")
def ev():
    return texts.evaluation_text()


def test_calibration_is_pydoc_topics(cal):
    from pydoc_data.topics import topics

    assert len(cal) > 100_000
    first = min(topics)
    assert cal.startswith(topics[first].strip())
    assert "The \"assert\" statement" in cal or "assert" in cal[:2000]
    assert cal == texts.calibration_text()  # deterministic


def test_evaluation_is_license_texts(ev):
    assert len(ev) >= texts.MIN_TEXT_CHARS
    if (texts.LICENSES_DIR / "GPL-3").is_file():
        # GPL-3 is there once, although the GPL -> GPL-3 symlink names it twice.
        assert ev.count("The GNU General Public License is a free, copyleft license") == 1
    assert ev == texts.evaluation_text()


def test_calibration_and_evaluation_share_no_long_substring(cal, ev):
    """Different documents: no 40-character run of real text (whitespace-normalized) is in both.

    Only rule lines such as '-----' or '=====' may repeat.
    """
    a, b = " ".join(cal.split()), " ".join(ev.split())
    n = 40
    windows = {b[i : i + n] for i in range(len(b) - n + 1)}
    shared = {a[i : i + n] for i in range(len(a) - n + 1)} & windows
    textual = [s for s in shared if sum(ch.isalnum() for ch in s) >= 10]
    assert not textual, textual[:5]


def test_evaluation_fallback_to_python_license(tmp_path):
    lic = texts.python_license_path()
    if lic is None:
        pytest.skip("this Python has no LICENSE.txt")
    text = texts.evaluation_text(tmp_path / "missing")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text
    # A folder with only tiny files is also too little text: fall back as well.
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "BSD").write_text("short\n")
    assert texts.evaluation_text(tmp_path / "tiny") == text


def test_evaluation_dedupes_symlinks_and_skips_tiny(tmp_path):
    d = tmp_path / "lic"
    d.mkdir()
    (d / "A-1.0").write_text("alpha license\n" * 400)
    (d / "B-2.0").write_text("beta license\n" * 400)
    (d / "A").symlink_to("A-1.0")
    (d / "Z-tiny").write_text("tiny\n")
    text = texts.evaluation_text(d, min_chars=1000)
    assert text.count("alpha license") == 400 and text.count("beta license") == 400
    assert "tiny" not in text
    assert text.index("alpha") < text.index("beta")


def test_evaluation_too_little_text_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(texts, "python_license_path", lambda: None)
    with pytest.raises(RuntimeError, match="No evaluation text"):
        texts.evaluation_text(tmp_path / "missing")


def test_load_text(tmp_path, cal, ev):
    assert texts.load_text("calibration") == cal == texts.load_text("pydoc")
    assert texts.load_text("evaluation") == ev == texts.load_text("Licenses")
    f = tmp_path / "doc.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert texts.load_text(str(f)) == "héllo wörld\n"
    assert texts.load_text(f) == "héllo wörld\n"
    with pytest.raises(FileNotFoundError, match="calibration"):
        texts.load_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc\xc3")
    with pytest.raises(ValueError, match="UTF-8"):
        texts.load_text(bad)
    with pytest.raises(IsADirectoryError):
        texts.load_text(tmp_path)


# ------------------------------------------------------------------------------------------- token_contexts ---


def test_token_contexts_with_bos():
    tok = tiny_tokenizer()
    text = "abcdefghij" * 10  # 100 tokens
    x = texts.token_contexts(tok, text, 8)
    assert x.dtype == torch.long and x.shape == (100 // 7, 8)
    assert (x[:, 0] == tok.bos_token_id).all()
    # Non-overlapping, in order: the text tokens read back the start of the text.
    assert tok.decode(x[:, 1:].flatten().tolist()) == text[: x.shape[0] * 7]
    y = texts.token_contexts(tok, text, 8, num_contexts=3)
    assert torch.equal(y, x[:3])


def test_token_contexts_without_bos():
    text = "abcdefghij" * 10
    for tok, bos in ((tiny_tokenizer(), False), (tiny_tokenizer(bos=False), True)):
        x = texts.token_contexts(tok, text, 8, bos=bos)
        assert x.shape == (12, 8)
        assert tok.decode(x.flatten().tolist()) == text[:96]


def test_token_contexts_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="fewer than one context"):
        texts.token_contexts(tok, "short", 16)
    with pytest.raises(ValueError, match="holds only 2"):
        texts.token_contexts(tok, "x" * 30, 16, num_contexts=3)
    with pytest.raises(ValueError, match="no room"):
        texts.token_contexts(tok, "x" * 30, 1)
    with pytest.raises(ValueError, match="context_len"):
        texts.token_contexts(tok, "x" * 30, 0)
    with pytest.raises(ValueError, match="num_contexts"):
        texts.token_contexts(tok, "x" * 30, 4, num_contexts=0)
    # Exactly one context fits.
    assert texts.token_contexts(tok, "x" * 15, 16).shape == (1, 16)


@pytest.mark.slow
def test_smollm2_token_counts(smollm2, cal, ev):
    """Both texts give plenty of SmolLM2 tokens, and the tokenizer round-trips them."""
    _, tok = smollm2
    n_cal = len(tok(cal, add_special_tokens=False).input_ids)
    n_ev = len(tok(ev, add_special_tokens=False).input_ids)
    assert n_cal > 50_000, n_cal  # ~113k on Python 3.11
    assert n_ev > 3_000, n_ev  # ~52k from /usr/share/common-licenses; ~3.5k from Python's LICENSE.txt
    x = texts.token_contexts(tok, ev, 512)
    assert x.shape == (n_ev // 511, 512)
    assert (x[:, 0] == tok.bos_token_id).all() and tok.bos_token_id is not None
    assert tok.decode(x[0, 1:]) == tok.decode(tok(ev, add_special_tokens=False).input_ids[:511])
