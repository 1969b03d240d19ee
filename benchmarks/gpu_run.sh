#!/usr/bin/env bash
# On the GPU machine (no network): install the wheels of benchmarks/gpu_prepare.sh over the
# machine's own torch, then run python -m benchmarks.gpu within a time limit; its JSON, log and the
# machine's description land in $OUT. Extra arguments go to the benchmark.
#
#   bash benchmarks/gpu_run.sh [--queries 3 ...]      (carry benchmarks/wheels; LIMIT=seconds)
#
# Installed with --target and PYTHONPATH rather than into a new venv: the machine's python3 is
# itself a venv (/opt/torch/.venv), and a venv made from it with --system-site-packages would see
# the base interpreter's packages, not torch. qloc runs from src/ (pure Python, nothing to build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qloc-gpu}
LIMIT=${LIMIT:-420}
SITE=/tmp/qloc-site
mkdir -p "$OUT"

{
    nvidia-smi
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|safetensors|regex|hugg)"
} >"$OUT/machine.txt" 2>&1
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    benchmarks/wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, qloc
print('torch', torch.__version__, 'transformers', transformers.__version__, 'qloc', qloc.__file__,
      'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/machine.txt" || exit 1
timeout "$LIMIT" python3 -m benchmarks.gpu --device cuda --profile amig --json "$OUT/gpu.json" "$@" 2>&1 |
    tee "$OUT/gpu.log"
