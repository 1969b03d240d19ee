"""The query-KN mapping experiment: the five sets on hand-made KN sets, and the CLI end to end."""

import random

import pandas as pd

from qloc.report.captions import caption
from qloc.studies.mapping import mapping_figure, mapping_sets, mapping_table
from qloc.studies.registry import Panel

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


def test_table_means_medians_and_intervals_per_class_and_overall():
    rows = [
        {"method": "ig", "operation": "suppress", "kn_set": "self", "class": c, "dprob": d, "set_size": n}
        for c, d, n in (("KC", -0.5, 3), ("KC", -0.3, 2), ("KC", 40.0, 1), ("KI", -0.1, 4), ("KI", 0.0, 0))
    ]
    table = mapping_table(pd.DataFrame(rows)).set_index("class")
    assert abs(table.loc["KC", "dprob"] - 39.2 / 3) < 1e-12 and table.loc["KC", "dprob_median"] == -0.3
    # The empty KI set changed nothing: it is counted, not averaged in as a dProb of 0.
    assert table.loc["KI", "dprob"] == -0.1 and table.loc["KI", "empty_sets"] == 1
    assert table.loc["Avg", "queries"] == 5 and table.loc["Avg", "empty_sets"] == 1
    # One outlier decides the KC mean; its interval says so, the median does not move.
    assert table.loc["KC", "ci_low"] <= -0.3 and table.loc["KC", "ci_high"] >= 39.0 / 3
    assert (table["ci_low"] <= table["dprob"]).all() and (table["dprob"] <= table["ci_high"]).all()


def test_empty_sets_are_counted_and_left_out_of_every_statistic():
    rows = [
        {"method": "amig", "operation": op, "kn_set": kn_set, "class": "KI", "dprob": d, "set_size": n}
        for op in ("suppress", "enhance")
        for kn_set, d, n in (
            ("intersection", 0.0, 0),
            ("intersection", 0.0, 0),
            ("intersection", -0.8, 2),
            ("intersection", -0.4, 1),
            ("refine", 0.0, 0),
            ("refine", 0.0, 0),
            ("self", -0.6, 3),
            ("self", -0.2, 3),
        )
    ]
    table = mapping_table(pd.DataFrame(rows))
    ki = table[(table["class"] == "KI") & (table["operation"] == "suppress")].set_index("kn_set")
    assert ki.loc["intersection", "queries"] == 4 and ki.loc["intersection", "empty_sets"] == 2
    assert abs(ki.loc["intersection", "dprob"] + 0.6) < 1e-12
    assert abs(ki.loc["intersection", "dprob_median"] + 0.6) < 1e-12
    assert -0.8 <= ki.loc["intersection", "ci_low"] <= ki.loc["intersection", "ci_high"] <= -0.4
    # A set empty for every query has no statistic at all, not a dProb of 0.
    assert ki.loc["refine", "empty_sets"] == 2 and ki.loc["refine", ["dprob", "ci_low"]].isna().all()
    assert ki.loc["self", "empty_sets"] == 0 and abs(ki.loc["self", "dprob"] + 0.4) < 1e-12
    figure = mapping_figure(table)
    labels = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert any("Intersection 2" in label and "Refine 2" in label for label in labels)
    panel = Panel(70, "Figure 4", ("fig4_mapping",), ("fig4_mapping",))
    text = caption("fig4_mapping", {"fig4_mapping": table}, panel)
    assert "AMIG Intersection 2, Refine 2 (column empty_sets)" in text and "left out" in text
