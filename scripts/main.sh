#!/usr/bin/env bash
# Set-up (idempotent), then the main job on the default model (SmolLM2-135M-Instruct):
# compile it with backend="antkv", measure perplexity through the compiled decode path, print the KV memory
# against full precision, and generate text. Extra arguments go to `antkv-compile demo`
# (e.g. --bits 0.375, --ppl-tokens 2048, --out result.json).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
PY="${ANTKV_PYTHON:-$ROOT/.venv/bin/python}"

exec "$PY" -m antkv_compile.cli demo "$@"
