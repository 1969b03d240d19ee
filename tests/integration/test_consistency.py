"""KN consistency: scores on hand-made KN sets, Otsu, Welch, Table 1, plot data, and a localize
sweep killed midway that resumes to the same tables."""

import subprocess
import sys

import pandas as pd
import pytest

from qloc.runs.store import RunStore
from tests.helpers import kill_midway


def _localize(model_dir, run_dir):
    return [
        sys.executable,
        "-m",
        "qloc.cli",
        "localize",
        "--model",
        str(model_dir),
        "--run-dir",
        str(run_dir),
        "--facts-per-relation",
        "1",
        "--methods",
        "ig,amig",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]


def test_killed_sweep_resumes_to_the_same_tables(tmp_path, tiny_model_dir):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert 3 <= kill_midway(_localize(tiny_model_dir, killed), killed, 3) < 31
    for run in (killed, clean):
        subprocess.run(_localize(tiny_model_dir, run), check=True, capture_output=True)
        subprocess.run(
            [sys.executable, "-m", "qloc.cli", "consistency", "--run-dir", str(run)],
            check=True,
            capture_output=True,
        )
    for name in ("table1.csv", "consistency.csv"):
        resumed = pd.read_csv(killed / "tables" / name).sort_values(
            list(pd.read_csv(killed / "tables" / name).columns[:4])
        )
        uninterrupted = pd.read_csv(clean / "tables" / name).sort_values(list(resumed.columns[:4]))
        pd.testing.assert_frame_equal(resumed.reset_index(drop=True), uninterrupted.reset_index(drop=True))
    assert (killed / "figures" / "violin_ig.png").stat().st_size > 10_000
    assert (killed / "figures" / "fig9_threshold.svg").exists()


def test_demo_runs_the_main_job(tmp_path, tiny_model_dir):
    run = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qloc.cli",
            "demo",
            "--model",
            str(tiny_model_dir),
            "--facts",
            "3",
            "--methods",
            "ig",
            "--known",
            "1000",
            "--run-dir",
            str(run),
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model | method | threshold |" in result.stdout
    table = pd.read_csv(run / "tables" / "table1.csv")
    assert set(table.threshold) == {"static", "otsu"} and (table.facts == 3).all()
    assert (run / "figures" / "violin_ig.svg").exists()
    printed = " ".join(result.stdout.split())  # the terminal may wrap the line
    assert "Report (open in a browser" in printed and (run / "report.html").exists()
    assert "paper's 3 cells over its models" in (run / "report.md").read_text()  # the verdicts' paper cells
    with RunStore.open_existing(run) as store:  # the facts are known ones, from a census of 64 per relation
        assert (
            store.params("census")["facts_per_relation"] == 64 and store.params("localize")["known"] == 1000
        )


@pytest.mark.parametrize(
    "option",
    [
        ["--rule", "simpson"],
        ["--answer-tokens", "last"],
        ["--steps", "0"],
        ["--top-k", "0"],
        ["--methods", "ig,lrp"],
    ],
)
def test_bad_localize_options_are_refused_before_anything_is_stored(tmp_path, option):
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qloc.cli",
            "localize",
            "--model",
            "no-model-needed",
            "--run-dir",
            str(run),
            *option,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and option[1] in result.stderr and "Traceback" not in result.stderr
    assert not (run / "qloc.sqlite").exists()


def test_cli_consistency_writes_the_null_and_the_sensitivity_table(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    subprocess.run(
        _localize(tiny_model_dir, run)[:-1] + ["--relations", "P19,P36,P101", "--save-scores", "--quiet"],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "qloc.cli", "consistency", "--run-dir", str(run)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(run / "tables" / "table1.csv")
    assert table["cs_null_mean"].between(0, 1).all() and not table["degenerate"].any()  # a Llama: IG is sound
    sensitivity = pd.read_csv(run / "tables" / "threshold_sensitivity.csv")
    assert set(sensitivity["kn_rule"]) == {"t=0.1", "t=0.2", "t=0.3", "t=0.5", "top10", "top50"}
    assert set(sensitivity["method"]) == {"ig", "amig"} and (sensitivity["facts"] == 3).all()
    static = table[table.threshold == "static"].set_index("method")
    at_default = sensitivity[sensitivity.kn_rule == "t=0.2"].set_index("method")
    # The fp16 dense scores give the stored fp32 KN sets' KI share, up to neurons on the cut.
    assert (at_default["R_KI_static"] - static["R_KI"]).abs().max() <= 1 / 3
    assert (run / "figures" / "threshold_sensitivity.png").exists() and (
        run / "tables" / "cs_null.csv"
    ).exists()
    ablation = pd.read_csv(run / "tables" / "cs_ablation.csv")
    assert set(ablation["group"]) == {"-", "b", "c", "d", "e", "f", "g"}  # (a) needs an all-tokens run
    assert (run / "figures" / "cs_ablation.png").exists()
    assert set(pd.read_csv(run / "tables" / "cs_by_queries.csv")["method"]) == {"ig", "amig"}
    assert pd.read_csv(run / "tables" / "table1_by_knowledge.csv")["facts"].sum() == 6  # 3 facts x 2 methods
