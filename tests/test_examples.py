"""Every script in examples/ runs as written (tiny model, CPU): exit 0, text generated, the graphs compressed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("examples") / "antkv-1-pre-rope"  # calibrated by the first example, reused


def test_examples_are_listed():
    assert EXAMPLES == ["forward_static_cache.py", "generate.py", "generate_compile_config.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, artifact_dir):
    env = {**os.environ, "ANTKV_EXAMPLE_TINY": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--artifact", str(artifact_dir)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generated: '" in r.stdout
    if "compressed graphs:" in r.stdout:
        line = next(l for l in r.stdout.splitlines() if l.startswith("compressed graphs:"))
        n, total = line.split(":")[1].split(" compiled")[0].split(" of ")
        assert int(n) == int(total) > 0, line
    else:
        assert "rewrite 2 site(s)" in r.stdout
    assert "deprecated" not in r.stderr and "Traceback" not in r.stderr
    assert (artifact_dir / "manifest.json").is_file()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block runs as written, with the default model swapped for the tiny one (CPU, seconds):
    it loads, calibrates once, compiles, generates, and every graph it compiled was compressed."""
    import re

    import antkv_compile.models as models
    from antkv_compile.backend import last_compiles

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    blocks = [b for b in blocks if "torchrun" not in b.splitlines()[0]]  # a torchrun script needs its launcher
    assert blocks, "the README has no Python example"
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (models.tiny_model("llama"), models.tiny_tokenizer()))
    monkeypatch.chdir(tmp_path)
    last_compiles.clear()
    for code in blocks:
        code = code.replace('options={"artifact": artifact}', 'options={"artifact": artifact, "inner": "eager"}')
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "artifacts" / "smollm2-demo" / "antkv-1-pre-rope" / "manifest.json").is_file()
    assert last_compiles and all(r["after"] is not None for r in last_compiles)
