"""Quiet by default: our calls pass the cache under the keyword transformers takes (no deprecation notice),
progress bars appear only on a terminal, and scripts/test.sh keeps pytest's summary line whatever is added."""
import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import StaticCache

from antkv_compile.hf_compat import cache_keyword, with_cache
from antkv_compile.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_package_never_passes_the_deprecated_keyword():
    """No call in antkv_compile passes ``past_key_values=`` (the naming module only parses Dynamo's names)."""
    offenders = []
    for path in (ROOT / "antkv_compile").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "past_key_values" for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_with_cache_is_silent_and_fills_the_cache(caplog):
    model = tiny_model("llama")
    assert cache_keyword(model) in ("cache", "past_key_values")
    assert cache_keyword(torch.compile(model, backend="eager")) == cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=8)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(**with_cache(model, cache, input_ids=torch.tensor([[5, 6, 7]])))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert int(cache.get_seq_length()) == 3


def test_demo_and_inspect_use_the_current_keyword():
    files = [ROOT / "antkv_compile" / n for n in ("demo.py", "cli.py")]
    files += sorted((ROOT / "antkv_compile" / "bench").glob("*.py"))
    assert len(files) > 3
    for path in files:
        assert "past_key_values=" not in path.read_text()


def test_progress_bars_only_on_a_terminal():
    code = ("import sys, torch\n"
            "from antkv_compile.calibration import collect_statistics\n"
            "from antkv_compile.models import tiny_model\n"
            "collect_statistics(tiny_model('llama'), torch.randint(3, 500, (2, 16)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibration forward" not in r.stderr  # stderr is a pipe here, not a terminal


@pytest.mark.parametrize("extra", [[], ["-q"], ["-xq", "-k", "test_a"]])
def test_test_script_keeps_the_summary_line(tmp_path, extra):
    (tmp_path / "test_one.py").write_text("def test_a():\n    pass\n")
    args = subprocess.run(["bash", "-c", 'source scripts/pytest_args.sh; pytest_args "$@"', "_", *extra],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert sum(a in ("-q", "--quiet") or (a.startswith("-") and not a.startswith("--") and "q" in a) for a in args) <= 1
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(tmp_path / "test_one.py")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "1 passed" in r.stdout, r.stdout
