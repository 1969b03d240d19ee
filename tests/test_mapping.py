"""The query-KN mapping experiment: the five sets on hand-made KN sets, and the CLI end to end."""

import random
import subprocess
import sys

import pandas as pd

import qloc
from qloc.mapping import mapping_sets, mapping_table

KN = [[(0, 1), (0, 2), (1, 5)], [(0, 1), (2, 2)], [(0, 1), (2, 2), (3, 3)], [(0, 1), (1, 5)]]


def test_sets_for_one_query():
    sets = mapping_sets(KN, 0, (4, 8), random.Random(0))
    assert sets["self"] == [(0, 1), (0, 2), (1, 5)]
    assert sets["union"] == [(0, 1), (1, 5), (2, 2), (3, 3)]
    assert sets["intersection"] == [(0, 1)]
    assert sets["refine"] == [(0, 1), (2, 2)]  # in >= 2 of the other queries' sets
    everything = {u for s in KN for u in s}
    assert len(sets["unrelated"]) == 3 and not set(sets["unrelated"]) & everything
    assert sets == mapping_sets(KN, 0, (4, 8), random.Random(0))
    assert sets["unrelated"] != mapping_sets(KN, 0, (4, 8), random.Random(1))["unrelated"]


def test_unrelated_never_exceeds_the_free_neurons():
    crowded = [[(0, 0), (0, 1), (0, 2)], [(0, 0)]]
    assert len(mapping_sets(crowded, 0, (1, 4), random.Random(0))["unrelated"]) == 1


def test_table_means_per_class_and_overall():
    rows = [{"method": "ig", "operation": "suppress", "kn_set": "self", "class": c, "dprob": d}
            for c, d in (("KC", -0.5), ("KC", -0.3), ("KI", -0.1))]
    table = mapping_table(pd.DataFrame(rows)).set_index("class")
    assert table.loc["KC", "dprob"] == -0.4 and table.loc["KI", "dprob"] == -0.1
    assert abs(table.loc["Avg", "dprob"] - (-0.9 / 3)) < 1e-12 and table.loc["Avg", "queries"] == 3


def test_cli_mapping(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "qloc.cli"]
    subprocess.run(base + ["localize", "--model", str(tiny_model_dir), "--run-dir", str(run), "--relations", "P19,P36",
                           "--methods", "ig", "--steps", "3", "--device", "cpu", "--quiet"], check=True, capture_output=True)
    result = subprocess.run(base + ["mapping", "--run-dir", str(run), "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        mapping = store.frame("mapping")
        queries = store.frame("kn_sets").shape[0]
    assert len(mapping) == queries * 5 * 2
    self_sets = mapping[mapping.kn_set == "self"]
    assert (mapping[mapping.kn_set == "unrelated"].set_size.to_numpy() == self_sets.set_size.to_numpy()).all()
    assert (run / "figures" / "fig4_mapping.svg").exists()
    assert set(pd.read_csv(run / "tables" / "fig4_mapping.csv")["class"]) >= {"Avg"}
