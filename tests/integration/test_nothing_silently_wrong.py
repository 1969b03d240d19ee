"""Issue 23, "Nothing silently wrong": inputs that gave exit status 0 with wrong results, or a
traceback, now give one line naming the input and exit status 2 (or a right result), through the
console entry point in this process. Each test names the case of the issue it covers; the second set
(our own bad inputs, tried the same way) is at the end."""

from __future__ import annotations

import json

from tests.helpers import assert_refused, localize_args


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
