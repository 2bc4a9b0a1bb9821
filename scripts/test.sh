#!/usr/bin/env bash
# Set-up (idempotent), then the test suite: `python -m pytest -q`. Extra arguments go to pytest (our -q is
# dropped when they set the verbosity themselves, so the summary line stays),
# e.g. `bash scripts/test.sh -k texts -x`. Without CUDA, Triton kernels run under the Triton interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
PY="${ANTKV_PYTHON:-$ROOT/.venv/bin/python}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
    echo "test: no CUDA, running Triton kernels under TRITON_INTERPRET=$TRITON_INTERPRET"
fi

source scripts/pytest_args.sh
mapfile -t ARGS < <(pytest_args "$@")
exec "$PY" -m pytest "${ARGS[@]}"
