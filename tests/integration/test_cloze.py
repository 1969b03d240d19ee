"""Cloze scoring against direct forward passes, on tiny and real models, from Python and the CLI."""

import json

from tests.helpers import run_cli


def test_blank_answers_are_malformed_rows_named_by_the_cli(tmp_path, tiny_model_dir):
    data = {
        "P1": [
            [["X is in [MASK].", " ", "P1(x)"], ["X lies in [MASK].", " ", "P1(x)"]],
            [
                ["Paris is the capital of [MASK].", "France", "P1(x)"],
                ["The capital of France is [MASK].", "France", "P1(x)"],
            ],
        ]
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    result = run_cli(
        "cloze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "fact P1/0 row 0" in result.stderr and "1 done" in result.stdout


def test_cli_input_errors_exit_2_with_a_message():
    result = run_cli("cloze", "--prompt", "only a prompt")
    assert result.returncode == 2 and "--prompt and --answer go together" in result.stderr
    result = run_cli("facts", "--relations", "P19,P0")
    assert result.returncode == 2 and "P0" in result.stderr and "Traceback" not in result.stderr
