"""The query-KN mapping experiment: the five sets on hand-made KN sets, and the CLI end to end."""

import subprocess
import sys

import pandas as pd

import qloc
from tests.helpers import localize_tiny


def test_cli_mapping(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "qloc.cli"]
    localize_tiny(tiny_model_dir, run, "--relations", "P19,P36")
    result = subprocess.run(
        # The tiny run's few facts count the filter's shares, as a run of >= 50 facts would.
        base + ["mapping", "--run-dir", str(run), "--device", "cpu", "--quiet", "--shared-min-facts", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        mapping = store.frame("mapping")
        queries = store.frame("kn_sets").shape[0]
    assert len(mapping) == queries * 5 * 2
    self_sets = mapping[mapping.kn_set == "self"]
    assert (mapping[mapping.kn_set == "unrelated"].set_size.to_numpy() == self_sets.set_size.to_numpy()).all()
    assert (run / "figures" / "fig4_mapping.svg").exists()
    table = pd.read_csv(run / "tables" / "fig4_mapping.csv")
    assert set(table["class"]) >= {"Avg"} and {"dprob_median", "ci_low", "ci_high", "empty_sets"} <= set(
        table
    )
    # The tiny model's KNs are shared by every fact: the default shared filter removes some.
    assert (mapping[mapping.kn_set == "self"].self_dropped > 0).any()


def test_cli_mapping_on_a_stratified_sample(tmp_path, tiny_model_dir):
    import shutil

    from qloc.studies.localize_run import read_localized_run

    run, by_otsu = tmp_path / "run", tmp_path / "by-otsu"
    localize_tiny(tiny_model_dir, run, "--relations", "P19,P36", "--facts-per-relation", "2")
    shutil.copytree(run, by_otsu)

    def mapping(*options: str, run_dir=run) -> subprocess.CompletedProcess:
        command = ["mapping", "--run-dir", str(run_dir), "--device", "cpu", "--quiet", *options]
        return subprocess.run([sys.executable, "-m", "qloc.cli", *command], capture_output=True, text=True)

    first = mapping("--limit", "2", "--stratify", "static")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "KC and" in first.stdout and "static threshold, ig KN sets" in first.stdout
    assert "shared-neuron filter 0.1 not applied: this run has 4 facts" in first.stdout
    with qloc.RunStore.open_existing(run) as store:
        params = store.params("mapping-ig")
        assert store.frame("mapping")["fact_id"].nunique() == 2
    assert params["stratify"] == "static" and params["stratify_method"] == "ig"
    # Another stratification is another sample: the stage refuses it by name.
    other = mapping("--limit", "2", "--stratify", "otsu")
    assert other.returncode == 2 and "stratify: stored 'static', given 'otsu'" in other.stderr
    # A larger limit extends the same stratified sample.
    more = mapping("--limit", "3", "--stratify", "static")
    assert more.returncode == 0, more.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        units = store.units("mapping-ig")
    assert len(units) == 3 and (units.status == "done").all()
    # A stage stratified by Otsu's threshold labels its rows with the Otsu classes it sampled by.
    otsu = mapping("--limit", "2", "--stratify", "otsu", run_dir=by_otsu)
    assert otsu.returncode == 0, otsu.stderr[-2000:]
    sampled = read_localized_run(by_otsu).sample(2, 0, "otsu").classes
    with qloc.RunStore.open_existing(by_otsu) as store:
        rows = store.frame("mapping")
    assert sampled and dict(zip(rows["fact_id"], rows["class"])) == sampled
