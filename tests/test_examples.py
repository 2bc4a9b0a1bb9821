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
