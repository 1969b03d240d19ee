"""Issue 23, "Nothing silently wrong", the cases that need no model: numbers and selections that were
accepted silently, data that reached the terminal as markup or escapes, and Markdown that carried
data as HTML. The cases that run a model are in tests/integration/test_nothing_silently_wrong.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from qloc.report.markdown import markdown_table as report_table
from qloc.runs.outputs import markdown_table
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
