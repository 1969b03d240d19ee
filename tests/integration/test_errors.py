"""Bad input gets one line naming it and exit status 2, before any expensive work and with nothing left
behind; analyses leave a run directory byte-for-byte unchanged, also a read-only one; one writer per run
directory; SIGINT and kills at random points lose nothing.

Most commands run in this process through ``qloc.cli.main`` (fast); interrupts, concurrent writers and
a user without write permission need their own processes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qloc.runs.lock import LOCK_FILE, STORE_FILE
from qloc.runs.store import RunStore
from tests.helpers import QLOC, assert_refused, localize_args

PROMPT, ANSWER = "Paris is the capital of", "France"


RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "superseded" / "smollm2-135m"


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under ``directory`` with a hash of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_file()
        else "folder"
        for path in sorted(directory.rglob("*"))
    }


def cloze_args(model: Path | str, *extra: str) -> list[str]:
    """One prompt, scored: the cheapest command that loads a model."""
    return ["cloze", "--model", str(model), "--prompt", PROMPT, "--answer", ANSWER, "--device", "cpu", *extra]


TINY_RUN_SELECTION = ("--relations", "P19,P36,P101", "--facts-per-relation", "2")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished localize run of a tiny model, with its consistency tables."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    localize = localize_args(tiny_model_dir, run, *TINY_RUN_SELECTION)
    for args in (localize, ["consistency", "--run-dir", str(run)]):
        result = subprocess.run(QLOC + args, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return run


def write_data(path: Path, relations: dict) -> Path:
    path.write_text(json.dumps(relations))
    return path


def usable_fact(subject: str, answer: str = "France") -> list[list[str]]:
    return [
        [f"{subject} is the capital of [MASK].", answer, "P1(capital of)"],
        [f"{subject} is a city of [MASK].", answer, "P1(capital of)"],
    ]


def unprivileged_prefix(probe_dir: Path) -> list[str]:
    """The command prefix that runs a process without write access to ``probe_dir`` (made read-only by
    the caller): nothing for a non-root user; as root, setpriv without the file-permission capabilities."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip(
                "running as root, and setpriv (util-linux) is missing to drop the file-permission "
                "capabilities"
            )
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    if subprocess.run(prefix + ["touch", str(probe_dir / "probe")], capture_output=True).returncode == 0:
        pytest.skip(f"cannot run a process that lacks write access to {probe_dir} here")
    return prefix


def write_gguf(path: Path) -> bytes:
    """A small llama GGUF: about 11 KB of metadata (a vocabulary) before 16 KB of tensor data."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"token{i:05d}" for i in range(500)])
    writer.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def stored_units(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"{(run_dir / STORE_FILE).as_uri()}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM units").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or a table not yet there
        return 0


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the sweep ended before {what}: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"the sweep never reached {what}"
        time.sleep(0.05)


def results(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every table of a run, in a canonical row order, without the per-unit timings."""
    with RunStore.open_existing(run_dir) as store:
        frames = {name: store.frame(name) for name in store.tables()}
        frames["units"] = store.units().drop(columns=["seconds", "finished"])
    for name, frame in frames.items():
        frame = frame.drop(columns=[c for c in ("seconds",) if c in frame])
        frames[name] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    return frames


def test_read_only_runs_are_analysed_by_a_user_who_cannot_write_them(tmp_path, tiny_model_dir):
    """`consistency` and `report` on a read-only copy of a committed result folder (a WAL-mode store
    written by an earlier qloc) work for a user without write permission, leave it byte-for-byte
    unchanged, and write where --out says; outputs into a read-only folder are refused first."""
    read_only = tmp_path / "read-only"
    shutil.copytree(RESULTS, read_only / "run")
    paths = [read_only, *read_only.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    writable = tmp_path / "out"
    writable.mkdir()
    env = {**os.environ, "MPLCONFIGDIR": str(writable / "matplotlib")}
    try:
        prefix = unprivileged_prefix(read_only / "run")
        before = snapshot(read_only)

        def qloc(*args: str | Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                prefix + QLOC + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600
            )

        run = read_only / "run"
        analysed = qloc("consistency", "--run-dir", run, "--out", writable / "consistency")
        assert analysed.returncode == 0, analysed.stderr[-3000:]
        assert len(pd.read_csv(writable / "consistency" / "tables" / "table1.csv"))
        reported = qloc("report", "--run-dir", run, "--out", writable / "report" / "report.html")
        assert reported.returncode == 0, reported.stderr[-3000:]
        assert "localize" in (writable / "report" / "report.html").read_text()

        refusals = {
            "consistency": qloc("consistency", "--run-dir", run),  # --out defaults to the run itself
            "report": qloc("report", "--run-dir", run, "--out", read_only / "report.html"),
            "attribute": qloc(
                "attribute",
                "--model",
                tiny_model_dir,
                "--prompt",
                PROMPT,
                "--answer",
                ANSWER,
                "--out",
                read_only / "scores.npy",
                "--device",
                "cpu",
            ),
        }
        for command, result in refusals.items():
            assert result.returncode == 2, (command, result.stderr[-2000:])
            assert "Traceback" not in result.stderr, (command, result.stderr[-2000:])
            assert "is not writable" in result.stderr and str(read_only) in result.stderr, command
        assert "loading" not in refusals["attribute"].stderr  # refused before the model was loaded
        assert snapshot(read_only) == before
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("source", ["committed WAL-mode store", "store written now"])
def test_analyses_leave_a_writable_run_directory_unchanged(tmp_path, tiny_run, qloc_cli, source):
    run = tmp_path / "run"
    shutil.copytree(RESULTS if source.startswith("committed") else tiny_run, run)
    before = snapshot(run)
    assert qloc_cli("consistency", "--run-dir", run, "--out", tmp_path / "c").code == 0
    assert qloc_cli("report", "--run-dir", run, "--out", tmp_path / "r" / "report.html").code == 0
    with RunStore.open_existing(run, readonly=True) as store:
        assert len(store.frame("kn_sets"))
    assert snapshot(run) == before  # no -wal or -shm file, no schema change


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_damaged_store_is_named_by_every_command(tmp_path, tiny_run, qloc_cli, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    store = run / STORE_FILE
    data = store.read_bytes()
    store.write_bytes(os.urandom(len(data)) if damage == "junk" else data[: len(data) // 2])
    before = snapshot(run)
    for args in (
        localize_args("no-model-needed", run, *TINY_RUN_SELECTION),
        ["consistency", "--run-dir", run, "--out", tmp_path / "c"],
        ["report", "--run-dir", run, "--out", tmp_path / "r.html"],
    ):
        assert_refused(qloc_cli(*args), f"run store '{store}' is not a SQLite database")
    assert snapshot(run) == before
    assert not (tmp_path / "c").exists() and not (tmp_path / "r.html").exists()


def test_damaged_gguf_files_are_named(tmp_path, qloc_cli, monkeypatch):
    monkeypatch.setenv("QLOC_CACHE", str(tmp_path / "cache"))
    whole = write_gguf(tmp_path / "whole.gguf")
    assert len(whole) > 20_000
    cases = {
        "random.gguf": (os.urandom(20_000), "is not a GGUF file"),
        "truncated.gguf": (whole[: len(whole) * 3 // 4], "is truncated or damaged"),
        "cut-5kb.gguf": (whole[:5_000], "is truncated or damaged (5,000 bytes)"),
        "empty.gguf": (b"", "is empty"),
    }
    for name, (data, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert_refused(qloc_cli(*cloze_args(path)), f"GGUF file '{path}' {problem}")
    assert not list((tmp_path / "cache").glob("models/*"))


def test_model_directory_without_weights_or_with_broken_json(tmp_path, tiny_model_dir, qloc_cli):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert_refused(
        qloc_cli(*cloze_args(no_weights)),
        f"model '{no_weights}': cannot load its weights",
        "no file named model.safetensors",
    )
    broken = tmp_path / "broken-json"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    assert_refused(qloc_cli(*cloze_args(broken)), f"model file '{broken / 'config.json'}' is not valid JSON")


def test_unknown_device_is_named_and_its_sweep_leaves_no_folder(tmp_path, tiny_model_dir, qloc_cli):
    assert_refused(qloc_cli(*cloze_args(tiny_model_dir, "--device", "tpu")), "--device 'tpu' is not a device")
    # The sweep took its run directory's lock (creating the folders) before the model failed to load.
    run = tmp_path / "new" / "run"
    sweep = localize_args(tiny_model_dir, run, "--relations", "P19", "--limit", "1")
    sweep[sweep.index("--device") + 1] = "tpu"
    assert_refused(qloc_cli(*sweep), "--device 'tpu' is not a device")
    assert list(tmp_path.iterdir()) == []


def test_second_writer_is_refused_at_once_naming_the_first(tmp_path, tiny_model_dir, qloc_cli):
    run, clean = tmp_path / "run", tmp_path / "clean"
    selection = ("--relations", "P19,P36,P101", "--facts-per-relation", "3")
    first = subprocess.Popen(
        QLOC + localize_args(tiny_model_dir, run, *selection),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: stored_units(run) >= 1, first, "its first fact")
        first.send_signal(signal.SIGSTOP)  # it keeps its lock, and cannot finish while the others try
        second = subprocess.run(
            QLOC + localize_args(tiny_model_dir, run, *selection), capture_output=True, text=True, timeout=600
        )
        # A model that cannot load shows that the lock is tried first.
        third = qloc_cli(*localize_args("no-model-needed", run, *selection))
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert second.stderr.count("\n") == 1
        held = f"run directory '{run}' is being written by another qloc process (PID {first.pid})"
        for stderr in (second.stderr, assert_refused(third)):
            assert held in stderr
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run / LOCK_FILE).exists()
    assert qloc_cli(*localize_args(tiny_model_dir, clean, *selection)).code == 0
    with RunStore.open_existing(run) as store:
        assert store.units()["unit_id"].is_unique and (store.units()["status"] == "done").all()
    stored, uninterrupted = results(run), results(clean)
    for name, frame in uninterrupted.items():
        pd.testing.assert_frame_equal(stored[name], frame)


def test_reading_needs_no_lock_and_a_writable_open_takes_it(tmp_path):
    with RunStore.open_stage(tmp_path / "run", "demo", {"x": 1}):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with RunStore.open_existing(tmp_path / "run") as reader:
            assert reader.params("demo") == {"x": 1}
    with RunStore.open_existing(tmp_path / "run", readonly=False):
        assert (tmp_path / "run" / LOCK_FILE).exists()
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "from qloc.runs.store import RunStore; "
                f"RunStore.open_stage({str(tmp_path / 'run')!r}, 'demo', {{'x': 1}})",
            ],
            capture_output=True,
            text=True,
        )
        assert "RunDirectoryError" in holder.stderr and f"PID {os.getpid()}" in holder.stderr
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_prompts_longer_than_the_context_are_refused_or_skipped(tmp_path, tiny_model_dir, qloc_cli):
    long_prompt = " ".join(["the"] * 200) + " capital of"  # the tiny model reads 128 positions
    for command in ("cloze", "attribute"):
        result = qloc_cli(
            command, "--model", tiny_model_dir, "--prompt", long_prompt, "--answer", ANSWER, "--device", "cpu"
        )
        assert_refused(result, "longer than the 128-token context", "'the the the")
    too_long = [
        [f"{long_prompt} [MASK].", "France", "P1(capital of)"],
        ["Lyon is a city of [MASK].", "France", "P1(capital of)"],
    ]
    data = write_data(tmp_path / "data.json", {"P1": [usable_fact("Paris"), too_long]})
    result = qloc_cli(
        *localize_args(tiny_model_dir, tmp_path / "run", "--data", data, "--facts-per-relation", 2)
    )
    assert result.code == 0, result.err
    with RunStore.open_existing(tmp_path / "run") as store:
        units = store.units("localize").set_index("unit_id")
    assert units.loc["P1/0", "status"] == "done" and units.loc["P1/1", "status"] == "skipped"
    assert units.loc["P1/1", "reason"].startswith("query longer than the model's context: fact P1/1")


def test_empty_selections_stop_before_the_model_loads(tmp_path, qloc_cli):
    malformed = write_data(tmp_path / "malformed.json", {"P1": [[["only", "two"]], [[1, 2, 3]]]})
    cases = {
        ("--facts-per-relation", "0"): "0 facts selected: --facts-per-relation 0",
        ("--limit", "0"): "0 facts selected: --limit 0",
        ("--data", str(malformed)): f"0 facts selected: ParaRel file '{malformed}' has no usable fact",
    }
    for option, message in cases.items():
        run = tmp_path / "run"
        assert_refused(qloc_cli(*localize_args("no-model-needed", run, *option)), message)
        assert not run.exists()


@pytest.mark.parametrize(
    "option, message",
    [(("--facts-per-relation", "-1"), "facts_per_relation -1"), (("--limit", "-2"), "limit -2")],
)
def test_negative_counts_are_refused(tmp_path, qloc_cli, option, message):
    result = qloc_cli(*localize_args("no-model-needed", tmp_path / "run", *option))
    assert_refused(result, message, "negative")
    assert not (tmp_path / "run").exists()


def test_output_paths_are_checked_before_computing(tmp_path, tiny_model_dir, tiny_run, qloc_cli):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert_refused(
        qloc_cli(
            "attribute",
            "--model",
            "no-model-needed",
            "--prompt",
            PROMPT,
            "--answer",
            ANSWER,
            "--out",
            a_file / "s.npy",
        ),
        f"cannot write the scores to '{a_file}'",
        "is a file",
    )
    assert_refused(
        qloc_cli("consistency", "--run-dir", tiny_run, "--out", a_file / "c"),
        "tables and figures",
        "is a file",
    )
    assert_refused(
        qloc_cli("report", "--run-dir", tiny_run, "--out", a_file / "r.html"), "the report", "is a file"
    )
    # Missing folders of --out are created, as consistency and report do.
    nested = tmp_path / "nodir" / "sub" / "s.npy"
    result = qloc_cli(
        "attribute",
        "--model",
        tiny_model_dir,
        "--prompt",
        PROMPT,
        "--answer",
        ANSWER,
        "--steps",
        "2",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        nested,
    )
    assert result.code == 0, result.err
    assert np.load(nested).shape == (3, 64)


def test_failed_consistency_leaves_no_folder_behind(tmp_path, tiny_model_dir, qloc_cli):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for run in (missing, empty):
        assert_refused(qloc_cli("consistency", "--run-dir", run), f"'{run}' is not a qloc run directory")
    assert not missing.exists() and list(empty.iterdir()) == []
    result = qloc_cli(*localize_args(tiny_model_dir, empty, "--relations", "P19", "--limit", "1"))
    assert result.code == 0, result.err


def test_malformed_rows_are_printed_literally_and_their_relation_named(tmp_path, qloc_cli):
    data = write_data(
        tmp_path / "data.json",
        {
            "P36": [[["[X] is the capital of [MASK].", 7, "P36(capital)"]]],
            "P19": [usable_fact("Paris"), usable_fact("[bold]Lyon", "[red]France")],
        },
    )
    result = qloc_cli("facts", "--data", data, "--relations", "P36")
    assert_refused(result, "relation(s) P36 of", "have no usable fact")
    assert "expected [query, answer, relation] strings" in result.err
    assert "['[X] is the capital of [MASK].', 7, 'P36(capital)']" in result.err
    shown = qloc_cli("facts", "--data", data, "--relations", "P19", "--show", "2")
    assert shown.code == 0
    assert "-> '[red]France'" in shown.out and "[bold]Lyon is the capital of ___" in shown.out


def test_sigint_prints_its_line_exits_130_and_resumes(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    args = QLOC + localize_args(tiny_model_dir, run, "--relations", "P19,P36,P101", "--facts-per-relation", 3)
    # A shell starts background jobs with SIGINT ignored, and children inherit that (pytest run with
    # `&` or nohup): the sweep gets Ctrl-C's default disposition back, as in a terminal.
    sweep = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: stored_units(run) >= 2, sweep, "its second fact")
        # Stopped, it cannot finish before the interrupt arrives; it gets SIGINT as it continues.
        sweep.send_signal(signal.SIGSTOP)
        assert sweep.poll() is None, "the sweep finished before the interrupt"
        sweep.send_signal(signal.SIGINT)
        sweep.send_signal(signal.SIGCONT)
        assert sweep.wait(timeout=600) == 130
    finally:
        if sweep.poll() is None:
            sweep.kill()
    stderr = sweep.stderr.read()
    assert "interrupted; finished units are stored and the same command resumes" in stderr
    assert "Traceback" not in stderr
    interrupted_at = stored_units(run)
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{interrupted_at} already stored" in resumed.stdout and stored_units(run) == 9


def test_five_kills_at_random_points_then_resume_equal_an_uninterrupted_run(tmp_path, tiny_model_dir):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    selection = ("--relations", "P19,P36,P101,P27", "--facts-per-relation", "6")
    command = QLOC + localize_args(tiny_model_dir, killed, *selection)
    rng = random.Random(13)
    # 0: as soon as the lock is taken, before the store exists; then after a random number of facts.
    kill_points = [0] + sorted(rng.sample(range(1, 24), 4))
    for point in kill_points:
        sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(
                lambda point=point: (killed / LOCK_FILE).exists() and stored_units(killed) >= point,
                sweep,
                f"{point} facts",
            )
        finally:
            sweep.kill()
            sweep.wait()
    assert 0 < stored_units(killed) < 24
    for run in (killed, clean):
        finished = subprocess.run(
            QLOC + localize_args(tiny_model_dir, run, *selection), capture_output=True, text=True, timeout=600
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
    assert stored_units(killed) == 24
    resumed, uninterrupted = results(killed), results(clean)
    assert resumed.keys() == uninterrupted.keys()
    for name, frame in uninterrupted.items():
        pd.testing.assert_frame_equal(resumed[name], frame)


def test_unknown_model_without_network_fails_fast_in_one_line(monkeypatch, qloc_cli):
    no_hub = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # refused at once
    unreachable = subprocess.run(
        QLOC + cloze_args("no-such-org/no-such-model", "--quiet"),
        capture_output=True,
        text=True,
        timeout=600,
        env=no_hub,
    )
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert "unknown model 'no-such-org/no-such-model'" in unreachable.stderr
    assert "tried the Hugging Face hub at http://127.0.0.1:9, which cannot be reached" in unreachable.stderr
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_refused(
        qloc_cli(*cloze_args("no-such-org/no-such-model")),
        "unknown model 'no-such-org/no-such-model'",
        "HF_HUB_OFFLINE is set",
    )
