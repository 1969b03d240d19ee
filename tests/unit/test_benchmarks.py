"""The benchmarks are plain importable code run from the repository root: no sys.path edits, no
mocks, parts of reviewable size; the GPU benchmark's dry run sizes an H200 it does not have."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import qloc
from benchmarks.gpu.measure import batch_rows_estimate
from benchmarks.gpu.models import H200_BYTES, LLAMA3_8B_PARAMETERS

ROOT = Path(__file__).resolve().parents[2]


def test_benchmarks_import_what_they_use_without_patching():
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "mock" not in text, path
        assert len(text.splitlines()) < 400, path


def test_h200_estimate_is_given_its_free_memory():
    """143,771 MiB less 16 GB of bf16 weights and the CUDA context (benchmarks/NOTES.md: 4,273 rows)."""
    estimate = batch_rows_estimate(32, torch.bfloat16, H200_BYTES, LLAMA3_8B_PARAMETERS * 2)
    assert estimate["batch_rows"] == 4273
    assert estimate["free_bytes"] == H200_BYTES - LLAMA3_8B_PARAMETERS * 2 - 2**29


def test_gpu_benchmark_dry_run_from_the_command_line():
    env = dict(os.environ, PYTHONPATH=str(Path(qloc.__file__).parents[1]), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "on an H200 (124.94 GiB free): 4273 rows" in done.stdout
