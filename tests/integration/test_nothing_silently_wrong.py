"""Issue 23, "Nothing silently wrong": inputs that gave exit status 0 with wrong results, or a
traceback, now give one line naming the input and exit status 2 (or a right result), through the
console entry point in this process. Each test names the case of the issue it covers; the second set
(our own bad inputs, tried the same way) is at the end."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qloc import cli
from qloc.errors import QlocError
from qloc.runs import outputs
from qloc.runs.rows import Row
from qloc.runs.store import RunStore
from tests.helpers import QLOC, assert_refused, localize_args
from tests.integration.test_errors import snapshot


def capital_facts(country: str, capital: str) -> dict:
    """A data file's relations: one fact with two usable queries, and a second fact."""
    return {
        "P36": [
            [
                [f"The capital of {country} is [MASK].", capital, "P36(capital)"],
                [f"{country}'s capital is [MASK].", capital, "P36(capital)"],
            ],
            [
                ["The capital of Italy is [MASK].", "Rome", "P36(capital)"],
                ["Italy's capital is [MASK].", "Rome", "P36(capital)"],
            ],
        ]
    }


def test_case1_changed_data_file_is_refused_naming_it(tmp_path, tiny_model_dir, qloc_cli, monkeypatch):
    data, run = tmp_path / "data.json", tmp_path / "run"
    data.write_text(json.dumps(capital_facts("France", "Paris")))
    localize = localize_args(tiny_model_dir, run, "--data", data, "--facts-per-relation", "2")
    assert qloc_cli(*localize).code == 0
    data.write_text(json.dumps(capital_facts("Japan", "Tokyo")))  # edited in place
    assert_refused(qloc_cli(*localize), "fact P36/0 (None -> 'Paris')", "-> 'Tokyo')", str(data))
    edit = ("edit", "--run-dir", run, "--mode", "erase", "--device", "cpu", "--quiet")
    assert_refused(qloc_cli(*edit), str(data), "'Tokyo'")
    # A relative --data that names another file from another directory.
    data.write_text(json.dumps(capital_facts("France", "Paris")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.json").write_text(json.dumps(capital_facts("Japan", "Tokyo")))
    relative_run = tmp_path / "relative-run"
    monkeypatch.chdir(tmp_path)
    relative = localize_args(tiny_model_dir, relative_run, "--data", "data.json", "--facts-per-relation", "2")
    assert qloc_cli(*relative).code == 0
    monkeypatch.chdir(elsewhere)
    assert_refused(qloc_cli(*relative), str(data), str(elsewhere / "data.json"))
    assert_refused(qloc_cli("edit", "--run-dir", relative_run, "--mode", "erase", "--device", "cpu"), "Tokyo")


def run_qloc(*args: str | Path) -> None:
    """``qloc ARGS`` in this process, for fixtures shared by a module (which cannot use qloc_cli)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["qloc", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    assert not exit_.value.code


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A localize run of 2 facts with its consistency tables and report."""
    run = tmp_path_factory.mktemp("reported") / "run"
    run_qloc(*localize_args(tiny_model_dir, run, "--relations", "P19,P36", "--facts-per-relation", "1"))
    run_qloc("consistency", "--run-dir", run)
    run_qloc("report", "--run-dir", run)
    return run


def test_case2_no_command_writes_over_a_runs_own_files(reported_run, qloc_cli, tmp_path):
    before = snapshot(reported_run)
    link = tmp_path / "innocent.html"
    link.symlink_to(reported_run / "qloc.sqlite")
    for own in ("qloc.sqlite", "params.json", "environment.json", "qloc.lock"):
        result = qloc_cli("report", "--run-dir", reported_run, "--out", reported_run / own)
        assert_refused(result, str(reported_run / own), "one of the files of run directory")
    assert_refused(qloc_cli("report", "--run-dir", reported_run, "--out", link), "one of the files")
    scores = ("attribute", "--model", "no-model-needed", "--prompt", "a", "--answer", "b")
    assert_refused(qloc_cli(*scores, "--out", reported_run / "params.json"), "one of the files")
    assert snapshot(reported_run) == before


def test_case9_full_disk_is_named_and_leaves_the_previous_outputs(reported_run, qloc_cli, monkeypatch):
    """ENOSPC in every write of qloc's outputs: one line naming the file; the report and tables
    written before stay whole, and no empty or temporary file is left."""
    before = snapshot(reported_run)

    class FullDisk(io.BytesIO):
        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open
    monkeypatch.setattr(
        outputs,
        "open",
        lambda path, mode: FullDisk() if "w" in mode else real_open(path, mode),
        raising=False,  # the module uses the builtin
    )
    html = reported_run / "report.html"
    assert_refused(qloc_cli("report", "--run-dir", reported_run), f"disk full at '{html}'")
    result = qloc_cli("consistency", "--run-dir", reported_run)
    assert_refused(result, "disk full at", str(reported_run / "tables"))
    assert snapshot(reported_run) == before


def test_case9_full_store_is_named_and_keeps_the_finished_units(tmp_path):
    """SQLite's SQLITE_FULL (the database cannot grow: a full disk) while committing a unit."""
    with RunStore.open_stage(tmp_path / "run", "stage", {"p": 1}, {}) as store:
        store.commit_unit("stage", "first", {}, 1.0)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        rows = {"big": [BigRow("x" * 100_000)]}
        with pytest.raises(QlocError, match=f"disk full at '{tmp_path / 'run' / 'qloc.sqlite'}'"):
            store.commit_unit("stage", "second", rows, 1.0)
        assert store.finished_units("stage") == {"first"}


@dataclass
class BigRow(Row):
    table = "big"
    text: str


def test_case11_out_folder_and_unwritable_out_are_refused_before_the_work(reported_run, qloc_cli, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert_refused(qloc_cli("report", "--run-dir", reported_run, "--out", folder), str(folder), "is a folder")
    # /sys passes os.access for root, but no file can be created there.
    result = qloc_cli("report", "--run-dir", reported_run, "--out", "/sys/report.html")
    assert_refused(result, "cannot write the report to '/sys'")
    assert_refused(
        qloc_cli("report", "--run-dir", reported_run, "--out", tmp_path / "r.md"), "cannot end in .md"
    )


def test_case3_report_recomputes_tables_that_predate_the_store(
    tmp_path, tiny_model_dir, qloc_cli, monkeypatch
):
    """Consistency on a localize run stopped part-way, then the run resumed: the report shows
    Table 1 over every fact the store holds, and says the files were stale."""
    run = tmp_path / "run"
    localize = localize_args(tiny_model_dir, run, "--relations", "P19,P36,P101", "--facts-per-relation", "1")
    commit, committed = RunStore.commit_unit, []

    def commit_two_then_stop(store, *args, **kwargs):
        commit(store, *args, **kwargs)
        committed.append(args)
        if len(committed) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as stopping:
        stopping.setattr(RunStore, "commit_unit", commit_two_then_stop)
        assert qloc_cli(*localize).code == 130
    assert qloc_cli("consistency", "--run-dir", run).code == 0
    assert qloc_cli(*localize).code == 0
    result = qloc_cli("report", "--run-dir", run)
    assert result.code == 0 and "predate its store" in result.err and str(run / "tables") in result.err
    report = (run / "report.md").read_text()
    assert "KN consistency over 3 facts" in report and "over 2 facts" not in report


def test_case4_one_fact_run_has_consistency_and_report(tmp_path, tiny_model_dir, qloc_cli):
    run = tmp_path / "run"
    assert qloc_cli(*localize_args(tiny_model_dir, run, "--relations", "P19", "--limit", "1")).code == 0
    result = qloc_cli("consistency", "--run-dir", run)
    assert result.code == 0, result.err
    assert "1 fact" in (run / "tables" / "table1.csv").read_text()
    assert qloc_cli("report", "--run-dir", run).code == 0
    assert "1 fact" in (run / "report.md").read_text()


def test_case5_prompts_are_echoed_as_text_not_markup(tiny_model_dir, qloc_cli):
    for prompt in ("In [/] the capital of France is", "The [red]capital[/red] of France is"):
        result = qloc_cli("cloze", "--model", tiny_model_dir, "--prompt", prompt, "--answer", "Paris")
        assert result.code == 0, result.err
        assert repr(prompt) in result.out


def test_case8_more_sequential_edits_than_facts_are_refused(reported_run, qloc_cli):
    result = qloc_cli("edit", "--run-dir", reported_run, "--mode", "update", "--sequential", "1000")
    assert_refused(result, "--sequential 1000", f"run '{reported_run}' has only 2 facts")


def test_case11_an_ascii_terminal_shows_data_as_escapes(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"P1": [[["Zürich is in [MASK].", "Schwéiz", "P1(x)"]] * 2]}))
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    shown = subprocess.run(
        [*QLOC, "facts", "--data", data, "--show", "1"], capture_output=True, text=True, env=env, timeout=600
    )
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "Z\\xfcrich is in ___" in shown.stdout
