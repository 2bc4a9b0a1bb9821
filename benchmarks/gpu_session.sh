#!/usr/bin/env bash
# The GPU runs behind the README's H200 figures, stage by stage, on the lent machine (its own python3 with torch,
# triton, transformers; nothing can be installed from a registry there):
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]      # logs and results under $OUT (default /tmp/antkv_out)
#
# What a call carries (ignored paths): .whl/ (gguf, pytest, hypothesis wheels: see `wheels` below) and the default
# model's GGUF split in two parts, .model/smollm2.gguf.part00 / part01 (the working tree that travels is limited
# to 64 MiB; the GGUF is 98 MB): one call carries part00, the next, on the still-warm machine, part01.
#
# Stages: model (join the GGUF parts), tests (GPU test files; TESTS="tests/test_cuda.py -k rope" narrows them),
# kernels (decode kernel bench), any other word = a shell command run as is (e.g. "python3 -m antkv_compile.cli
# fidelity --device cuda --model $GGUF ..."). Time on the H200: tests/test_cuda.py ~5 min, kernels ~1 min; the
# fidelity grid's full-precision pass alone took 7 min (fp32, batch 10: the masked SDPA materializes the scores).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/antkv_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ANTKV_CACHE_DIR=/tmp/antkv_cache
GGUF=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >/dev/null 2>&1 || echo "gpu_session: wheel install failed"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# backend="antkv" by name: the entry point an install would register (this checkout is on PYTHONPATH, not installed)
mkdir -p /tmp/site/antkv_compile_checkout-0.dist-info
printf 'Metadata-Version: 2.1\nName: antkv-compile-checkout\nVersion: 0\n' >/tmp/site/antkv_compile_checkout-0.dist-info/METADATA
printf '[torch_dynamo_backends]\nantkv = antkv_compile.backend:antkv_backend\n' \
    >/tmp/site/antkv_compile_checkout-0.dist-info/entry_points.txt

model() {
    mkdir -p "$(dirname "$GGUF")"
    if [[ -f .model/smollm2.gguf.part00 && -f .model/smollm2.gguf.part01 ]]; then
        cat .model/smollm2.gguf.part00 .model/smollm2.gguf.part01 >"$GGUF"
    fi
    ls -la "$GGUF" .model 2>&1
}

run_stage() {
    local stage=$1
    echo "=== $(date -u +%FT%TZ) stage $stage"
    case "$stage" in
        model) model ;;
        tests) python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cuda.py} 2>&1 | tee "$OUT/test_cuda_h200.log" ;;
        kernels) python3 benchmarks/kernels_bench.py --decode-only --rope --rep-ms "${REP_MS:-50}" --out "$OUT" 2>&1 |
                     tee "$OUT/kernels_bench_console.log" ;;
        *) bash -c "$stage" ;;
    esac
}

python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
for stage in "$@"; do
    run_stage "$stage"
done
