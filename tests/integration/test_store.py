"""The run store: per-fact transactions, resume, refusal of other parameters, and a real kill."""

import subprocess
import sys

from qloc.runs.store import RunStore
from tests.helpers import kill_midway


def _cloze_command(model_dir, run_dir):
    return [
        sys.executable,
        "-m",
        "qloc.cli",
        "cloze",
        "--model",
        str(model_dir),
        "--run-dir",
        str(run_dir),
        "--limit",
        "1500",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]


def test_kill_9_midway_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    at_kill = kill_midway(_cloze_command(tiny_model_dir, killed_dir), killed_dir, 20)
    assert 20 <= at_kill < 1500

    subprocess.run(_cloze_command(tiny_model_dir, killed_dir), check=True, capture_output=True)
    subprocess.run(_cloze_command(tiny_model_dir, clean_dir), check=True, capture_output=True)
    with RunStore.open_existing(killed_dir) as killed, RunStore.open_existing(clean_dir) as clean:
        resumed_units, clean_units = killed.units("cloze"), clean.units("cloze")
        assert resumed_units["unit_id"].is_unique and len(resumed_units) == len(clean_units) == 1500
        columns = ["fact_id", "query_index", "prompt", "answer", "prob", "rank", "logprob"]
        resumed = (
            killed.frame("cloze")[columns].sort_values(["fact_id", "query_index"]).reset_index(drop=True)
        )
        uninterrupted = (
            clean.frame("cloze")[columns].sort_values(["fact_id", "query_index"]).reset_index(drop=True)
        )
    assert resumed.equals(uninterrupted)
