"""`qloc reproduce` on a tiny model runs every stage, and `qloc report` makes one self-contained
HTML file that a headless browser shows with every figure."""

import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import qloc
from qloc.report import unit_counts, write_report

QLOC = [sys.executable, "-m", "qloc.cli"]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("reproduce") / "run"
    result = subprocess.run(QLOC + ["reproduce", "--model", str(tiny_model_dir), "--facts", "3", "--run-dir", str(run),
                                    "--known", "1000", "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_reproduce_runs_every_stage(reproduced):
    with qloc.RunStore.open_existing(reproduced) as store:
        stages = {s["stage"]: s["params"] for s in store.stages()}
        units = store.units()
    assert set(stages) == {"census", "localize", "edit-erase-amig", "edit-update-amig", "sequential-update-amig", "mapping-amig",
                           "synapses-amig"}
    assert stages["localize"]["methods"] == ["ig", "amig", "sig"] and stages["localize"]["steps"] == 20
    assert (units.status == "done").all()
    for table in ("table1", "table2", "table3", "table7", "fig4_mapping", "fig6_synapses", "table6_cost"):
        assert (reproduced / "tables" / f"{table}.csv").exists(), table
    for figure in ("fig4_mapping", "fig5_heatmap", "fig6_synapses", "fig9_threshold", "fig11_dkn_distributions", "violin_sig"):
        assert (reproduced / "figures" / f"{figure}.png").exists(), figure
    assert (reproduced / "report.html").exists() and (reproduced / "report.md").exists()


def test_rerun_resumes_without_recomputing(reproduced, tiny_model_dir):
    with qloc.RunStore.open_existing(reproduced) as store:
        before = store.units()
    command = QLOC + ["reproduce", "--model", str(tiny_model_dir), "--facts", "3", "--run-dir", str(reproduced),
                      "--known", "1000", "--device", "cpu", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("0 done, ") == 5  # localize, erase, update, mapping, synapses: nothing recomputed
    with qloc.RunStore.open_existing(reproduced) as store:
        pd.testing.assert_frame_equal(store.units(), before)
    # Another model in the same run directory is refused before anything runs, naming the parameter.
    other = subprocess.run(command[:3] + ["other-model"] + command[4:], capture_output=True, text=True)
    assert other.returncode == 2 and "model" in other.stderr


def test_report_embeds_every_table_and_figure(reproduced, tmp_path):
    written = write_report([reproduced], tmp_path / "report.html")
    page = written["html"].read_text()
    figures = sorted((reproduced / "figures").glob("*.png"))
    assert page.count("<img ") == len(figures) and "src=\"http" not in page and "<link" not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(figures)
    for csv in (reproduced / "tables").glob("*.csv"):
        assert f'download="{csv.name}"' in page
    assert "Table 1: KN consistency" in page and "synapses-amig" in page
    markdown = written["markdown"].read_text()
    assert "### Table 2: knowledge modification" in markdown and "| method |" in markdown


def test_unit_counts_group_skip_reasons():
    units = pd.DataFrame({"stage": ["a", "a", "a", "b"], "status": ["done", "skipped", "skipped", "done"],
                          "reason": [None, "answer not tokenizable: fact 1", "answer not tokenizable: fact 2", None],
                          "seconds": [1.0, None, None, 2.0]})
    counts = unit_counts(units).set_index("stage")
    assert counts.loc["a", "done"] == 1 and counts.loc["a", "skipped"] == 2
    assert counts.loc["a", "skip reasons"] == "2 answer not tokenizable" and counts.loc["b", "skip reasons"] == "-"


def test_report_refuses_a_directory_without_results(tmp_path):
    result = subprocess.run(QLOC + ["report", "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "no qloc tables" in result.stderr


@pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed (Debian: apt install chromium)")
def test_report_opens_in_headless_chromium_with_every_figure_shown(reproduced, tmp_path):
    html = write_report([reproduced], tmp_path / "report.html")["html"]
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    figures = len(list((reproduced / "figures").glob("*.png")))
    match = re.search(r'data-figures="(\d+)" data-figures-shown="(\d+)"', dom)
    assert match, dom[:500]
    assert int(match.group(1)) == figures > 5 and int(match.group(2)) == figures
