"""The Ray executor: a local 2-worker cluster stores what a local run stores, and a worker
killed mid-sweep costs no fact and duplicates none."""

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

import qloc
from tests.helpers import QLOC

ray = pytest.importorskip("ray", reason="the Ray executor needs qloc[ray]")


def _localize(model, run_dir, *extra, relations="P19,P36,P101", steps="3"):
    return QLOC + [
        "localize",
        "--model",
        str(model),
        "--run-dir",
        str(run_dir),
        "--relations",
        relations,
        "--methods",
        "ig,amig",
        "--steps",
        steps,
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _stored(run_dir: Path) -> pd.DataFrame:
    with qloc.RunStore.open_existing(run_dir) as store:
        frame = store.frame("kn_sets").drop(columns=["seconds"])
    return frame.sort_values(["unit_id", "method", "query_index"]).reset_index(drop=True)


def _units(run_dir: Path) -> pd.DataFrame:
    with qloc.RunStore.open_existing(run_dir) as store:
        return store.units("localize")


def _sweep_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"SweepWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _finished(run_dir: Path) -> int:
    try:
        with sqlite3.connect(run_dir / "qloc.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM units WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.real_model)])
def test_ray_run_stores_what_a_local_run_stores(tmp_path, tiny_model_dir, model):
    if model == "smollm2-135m" and not qloc.BUILTIN_MODELS[model].installed():
        pytest.skip("smollm2-135m is not installed")
    name = tiny_model_dir if model == "tiny" else model
    relations = "P19,P36,P101" if model == "tiny" else "P36,P19"
    # Ray gives each CPU actor one thread; the local run uses one too, so that both do the same
    # floating-point reductions and the stored numbers can be compared exactly.
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        _localize(name, tmp_path / "local", relations=relations),
        check=True,
        capture_output=True,
        env=one_thread,
    )
    result = subprocess.run(
        _localize(name, tmp_path / "ray", "--executor", "ray", "--workers", "2", relations=relations),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    local, distributed = _stored(tmp_path / "local"), _stored(tmp_path / "ray")
    assert len(local) > 0
    pd.testing.assert_frame_equal(local, distributed)
    with qloc.RunStore.open_existing(tmp_path / "ray") as store:
        assert store.params("localize") == qloc.RunStore.open_existing(tmp_path / "local").params("localize")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_killed_worker_loses_no_fact_and_writes_none_twice(tmp_path, tiny_model_dir):
    relations = "P19,P36,P101,P103,P27,P127,P106,P108"
    run = tmp_path / "ray"
    sweep = subprocess.Popen(
        _localize(
            tiny_model_dir, run, "--executor", "ray", "--workers", "2", relations=relations, steps="20"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while _finished(run) < 1 and sweep.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    workers = _sweep_worker_pids()
    assert sweep.poll() is None, (
        f"the sweep ended before a worker could be killed: {sweep.communicate()[1][-2000:]}"
    )
    assert workers, "no Ray worker process found"
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, stderr[-3000:]
    assert "retried after a worker died" in stdout
    units = _units(run)
    assert units.unit_id.is_unique and (units.status == "done").all() and len(units) == 8
    subprocess.run(
        _localize(tiny_model_dir, tmp_path / "local", relations=relations, steps="20"),
        check=True,
        capture_output=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    stored = _stored(run)
    assert not stored.duplicated(["unit_id", "method", "query_index"]).any()
    pd.testing.assert_frame_equal(_stored(tmp_path / "local"), stored)
