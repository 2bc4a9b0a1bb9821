#!/usr/bin/env bash
# Set-up (idempotent), then the main job: evaluate AnTKV compression on the default model
# (SmolLM2-135M-Instruct) at the quick setting. Extra arguments go to `antkv-compile eval`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
PY="${ANTKV_PYTHON:-$ROOT/.venv/bin/python}"

exec "$PY" -m antkv_compile.cli eval --quick "$@"
