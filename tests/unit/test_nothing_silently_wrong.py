"""Issue 23, "Nothing silently wrong", the cases that need no model: numbers and selections that were
accepted silently, data that reached the terminal as markup or escapes, and Markdown that carried
data as HTML. The cases that run a model are in tests/integration/test_nothing_silently_wrong.py."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from qloc import cli
from qloc.engine import gguf
from qloc.report.markdown import markdown_table as report_table
from qloc.runs.outputs import markdown_table
from qloc.runs.rows import Row
from qloc.runs.store import RunStore
from tests.helpers import assert_refused, localize_args

HOSTILE_CELL = "<img src=x onerror=alert(1)> a|b\nc `code` [link](javascript:x) *em*"


@pytest.mark.parametrize(
    "command, message",
    [
        (("edit", "--run-dir", "r", "--lambda2", "nan"), "--lambda2 nan: must be a finite number"),
        (("edit", "--run-dir", "r", "--lambda1", "inf"), "--lambda1 inf: must be a finite number"),
        (("edit", "--run-dir", "r", "--sequential", "-1"), "--sequential -1: must be at least 0"),
        (("edit", "--run-dir", "r", "--seeds", "0"), "--seeds 0: must be at least 1"),
        (localize_args("no-model", "r", "--max-batch-rows", "-1"), "--max-batch-rows -1: must be at least 1"),
        (localize_args("no-model", "r", "--max-batch-rows", "0"), "--max-batch-rows 0: must be at least 1"),
        (localize_args("no-model", "r", "--threshold", "nan"), "--threshold nan: must be a finite number"),
        (("cloze", "--model", "no-model", "--batch-size", "0"), "--batch-size 0: must be at least 1"),
        (localize_args("no-model", "r", "--relations", ""), "--relations '': names no relation"),
        (localize_args("no-model", "r", "--relations", " , "), "--relations ' , ': names no relation"),
    ],
)
def test_case8_numbers_and_selections_are_checked_before_any_work(
    tmp_path, qloc_cli, monkeypatch, command, message
):
    monkeypatch.chdir(tmp_path)
    assert_refused(qloc_cli(*command), message)
    assert not (tmp_path / "r").exists()


def test_case5_data_reaches_the_terminal_as_text(tmp_path, qloc_cli):
    """Markup in a data file is printed as it is, and an ANSI escape is shown, not obeyed."""
    data = tmp_path / "data.json"
    fact = [
        ["In [/] the capital of [red]France[/red] is [MASK].", "Paris\x1b[2J", "P36(capital)"],
        ["France's capital\x1b]0;owned\x07 is [MASK].", "Paris\x1b[2J", "P36(capital)"],
    ]
    data.write_text(json.dumps({"P36": [fact]}))
    result = qloc_cli("facts", "--data", data, "--show", "1")
    assert result.code == 0, result.err
    assert "In [/] the capital of [red]France[/red] is ___" in result.out
    assert "\x1b" not in result.out and "\x07" not in result.out
    assert "'Paris\\x1b[2J'" in result.out and "capital\\x1b]0;owned\\x07 is" in result.out


def test_case12_markdown_escapes_data_like_html():
    frame = pd.DataFrame({"prompt": [HOSTILE_CELL], "n": [1.5]})
    for table in (report_table(frame), markdown_table(frame)):
        lines = table.splitlines()
        assert len(lines) == 3 and all(line.count(" | ") == 1 for line in lines[::2]), table
        assert "<img" not in table and "&lt;img src=x onerror=alert(1)&gt;" in table
        assert "a\\|b<br>c \\`code\\` \\[link\\](javascript:x) \\*em\\*" in table


@pytest.mark.parametrize(
    "pairs, message",
    [
        ("{not json", "is not readable JSON"),
        ("[]", "expected an object mapping relation -> list of pairs"),
        ('{"P36": [[]]}', "entry 0 of relation 'P36' is [], not a [subject, object] pair"),
        ('{"P36": {"a": 1}}', "relation 'P36' is not a list of pairs"),
    ],
)
def test_case6_malformed_query_pairs_are_named(tmp_path, qloc_cli, pairs, message):
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps({"P36": [[["The capital of France is [MASK].", "Paris", "P36(capital)"]] * 2]})
    )
    (tmp_path / "query_pairs.json").write_text(pairs)
    assert_refused(
        qloc_cli("facts", "--data", data), f"query pairs file '{tmp_path / 'query_pairs.json'}'", message
    )


def test_case7_truncated_gzip_is_named(tmp_path, qloc_cli):
    data = tmp_path / "data.json.gz"
    data.write_bytes(gzip.compress(json.dumps({"P36": []}).encode() * 50)[:-20])
    assert_refused(qloc_cli("facts", "--data", data), f"ParaRel file '{data}' is not readable JSON")


def test_case10_unwritable_cache_is_refused_before_any_work(tmp_path, qloc_cli, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("QLOC_CACHE", str(a_file / "cache"))
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")  # never read: the cache is checked first
    result = qloc_cli("cloze", "--model", gguf_file, "--prompt", "a", "--answer", "b")
    assert_refused(result, f"qloc's cache '{a_file / 'cache' / 'models'}' is not writable", "QLOC_CACHE")


def test_case11_symlink_loop_run_dir_is_named(tmp_path, qloc_cli):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_refused(
        qloc_cli(*localize_args("no-model", loop, "--limit", "1")), f"'{loop}' is a symbolic link loop"
    )


def test_case13_smaller_cases(tmp_path, qloc_cli):
    # --data a folder, and a file that is not a regular file
    assert_refused(qloc_cli("facts", "--data", tmp_path), f"ParaRel file '{tmp_path}' is a folder")
    assert_refused(qloc_cli("facts", "--data", "/dev/null"), "ParaRel file '/dev/null' is not a regular file")
    # a relation given twice in a data file: JSON would keep only its second block
    data = tmp_path / "twice.json"
    block = '[[["X is in [MASK].", "Y", "P1(x)"], ["X lies in [MASK].", "Y", "P1(x)"]]]'
    data.write_text(f'{{"P1": {block}, "P1": {block}}}')
    assert_refused(qloc_cli("facts", "--data", data), f"'{data}' holds the key 'P1' twice")
    # queries without [MASK] at the end: no warning is printed, so none is referred to
    no_mask = tmp_path / "no-mask.json"
    no_mask.write_text(
        json.dumps({"P1": [[["[MASK] is X.", "Y", "P1(x)"], ["[MASK] lies in X.", "Y", "P1(x)"]]]})
    )
    line = assert_refused(
        qloc_cli("facts", "--data", no_mask, "--relations", "P1"), "[MASK] must end each query"
    )
    assert "warning" not in line


def test_case13_abandoned_gguf_conversions_are_removed(tmp_path):
    target = tmp_path / "models" / "model.Q4-0123"
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = target.parent / f".{target.name}.{dead.pid}.x1y2.partial"
    running = target.parent / f".{target.name}.{os.getpid()}.z3.partial"
    for staging in (abandoned, running):
        staging.mkdir(parents=True)
    gguf._remove_abandoned_conversions(target)
    assert not abandoned.exists() and running.exists()


def test_case13_interrupted_attribute_does_not_speak_of_finished_facts(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qloc", "attribute"])
    assert cli._interrupted() == "interrupted"
    monkeypatch.setattr(sys, "argv", ["qloc", "localize"])
    assert "finished units are stored" in cli._interrupted()


def test_case13_finished_units_whose_rows_were_dropped_are_computed_again(tmp_path):
    with RunStore.open_stage(tmp_path / "run", "localize", {}, {}) as store:
        store.commit_unit("localize", "P1/0", {"kn_sets": [KeptRow("a")], "cas_sets": [KeptRow("b")]}, 1.0)
        store.commit_unit("localize", "P1/1", {"kn_sets": [KeptRow("c")], "cas_sets": [KeptRow("d")]}, 1.0)
        assert store.forget_units_without_rows("localize", "kn_sets") == 0
        store._db.execute("DELETE FROM kn_sets WHERE unit_id = 'P1/1'")
        assert store.forget_units_without_rows("localize", "kn_sets") == 1
        assert store.finished_units("localize") == {"P1/0"} and len(store.frame("cas_sets")) == 1
        store._db.execute("DROP TABLE kn_sets")
        assert store.forget_units_without_rows("localize", "kn_sets") == 1
        assert store.finished_units("localize") == set() and store.frame("cas_sets").empty


@dataclass
class KeptRow(Row):
    table = "rows"
    text: str


SECOND_SET = [
    # Our own bad inputs, beyond the issue's: each must give one line naming it and exit status 2.
    (("consistency", "--run-dir", "loop"), "'loop' is not a qloc run directory"),
    (("report", "--run-dir", "loop"), "--run-dir 'loop': not a directory"),
    (("edit", "--run-dir", "loop"), "'loop' is not a qloc run directory"),
    (localize_args("no-model", "run", "--data", "loop"), "ParaRel file 'loop' does not exist"),
    (("facts", "--data", "/dev/null"), "'/dev/null' is not a regular file"),
    (localize_args("no-model", "run", "--methods", ""), "--methods '': choose from"),
    (localize_args("no-model", "run", "--steps", "0"), "--steps 0"),
    (localize_args("no-model", "run", "--threshold", "-1"), "--threshold -1.0: must be in (0, 1]"),
    (localize_args("no-model", "run", "--top-k", "0"), "--top-k 0: must be at least 1"),
    (("edit", "--run-dir", "run", "--shared-filter", "nan"), "--shared-filter nan: must be a finite number"),
    (("edit", "--run-dir", "run", "--shared-filter", "2"), "--shared-filter 2.0"),
    (("edit", "--run-dir", "run", "--lambda1", "-inf"), "--lambda1 -inf: must be a finite number"),
    (("attribute", "--prompt", "a", "--answer", "b", "--top", "-1"), "--top -1: must be at least 0"),
    (("facts", "--show", "-2"), "--show -2: must be at least 0"),
    (("consistency", "--run-dir", "a-file"), "is a file"),
    (("report", "--run-dir", "/dev/null"), "/dev/null"),
    (localize_args("no-model", "", "--limit", "1"), "is not empty and is not a qloc run directory"),
    (("report", "--run-dir", "run", "--out", "report.md"), "cannot end in .md"),
]


@pytest.mark.parametrize("command, message", SECOND_SET)
def test_second_set_of_bad_inputs_is_named_in_one_line(tmp_path, qloc_cli, monkeypatch, command, message):
    monkeypatch.chdir(tmp_path)
    Path("loop").symlink_to("loop")
    Path("a-file").write_text("not a run")
    assert_refused(qloc_cli(*command), message)
