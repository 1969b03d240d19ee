#!/usr/bin/env bash
# Here, where PyPI is reachable: download the wheels that benchmarks/gpu_run.sh installs on the GPU
# machine, which has no network. Its image brings Python 3.12, torch (CUDA) and most of qloc's
# dependencies, but transformers 5.17 where qloc needs >= 5.24. So carry transformers and the
# compiled packages it pins, at the versions this project's own venv runs (the CPU reference was
# made with them); everything else, torch and CUDA above all, comes from the GPU machine.
#
#   bash benchmarks/gpu_prepare.sh            (PYTHON=... to read the versions from another venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=benchmarks/wheels
LIMIT_MIB=50  # the working tree that travels may hold 64 MiB in all

# huggingface_hub stays behind: the machine's 1.33 satisfies transformers, and the 2.x here would
# need a further chain of HTTP packages.
packages=(transformers tokenizers safetensors regex)
pins=()
for package in "${packages[@]}"; do
    pins+=("$package==$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$package'))")")
done

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
# pip matches each manylinux tag exactly: name the ones these packages publish for x86-64.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${pins[@]}"

total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
ls -l "$WHEELS"
echo "wheels: ${pins[*]}: $((total / 1024)) KiB"
if ((total > LIMIT_MIB * 1024 * 1024)); then
    echo "over $LIMIT_MIB MiB: too large to travel with the working tree" >&2
    exit 1
fi
