"""KN consistency: scores on hand-made KN sets, Otsu, Welch, Table 1, plot data, and a localize
sweep killed midway that resumes to the same tables."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qloc.studies.consistency import consistency_study
from qloc.studies.consistency_figures import violin_figure
from qloc.studies.consistency_tables import (
    NO_NULL,
    classify,
    fact_consistency,
    ki_share_curve,
    null_consistency,
    relation_summary,
    table1,
    threshold_sensitivity,
)
from qloc.studies.knsets import consistency_score
from qloc.studies.statistics import otsu_threshold, welch


def hand_made_cs():
    rows = []
    values = {"ig": [0.0, 0.05, 0.5, 0.6], "amig": [0.02, 0.5, 0.08, 0.7], "sig": [0.01, 0.03, 0.09, 0.9]}
    for method, cs in values.items():
        for i, v in enumerate(cs):
            rows.append(
                {
                    "model": "m",
                    "fact_id": f"P{i % 2 + 1}/{i}",
                    "relation": f"P{i % 2 + 1}",
                    "method": method,
                    "cs_relaxed": v,
                    "cs_strict": v / 2,
                    "union_size": 0 if v == 0 else 3,
                }
            )
    return pd.DataFrame(rows)


def fact_rows(fact_sets, method="amig", model="m"):
    """kn_sets rows for facts given as lists of query KN sets."""
    return pd.DataFrame(
        [
            {
                "model": model,
                "fact_id": f"P1/{f}",
                "relation": "P1",
                "method": method,
                "query_index": q,
                "kn": kn,
            }
            for f, sets in enumerate(fact_sets)
            for q, kn in enumerate(sets)
        ]
    )


def test_consistency_score_relaxed_and_strict():
    sets = [[(0, 1), (0, 2), (3, 4)], [(0, 1), (0, 2)], [(0, 1), (5, 5)]]
    # union {(0,1),(0,2),(3,4),(5,5)}; in >1 set: (0,1),(0,2); in all: (0,1)
    assert consistency_score(sets) == pytest.approx(2 / 4)
    assert consistency_score(sets, strict=True) == pytest.approx(1 / 4)
    assert consistency_score([[(1, 1)], [(1, 1)]]) == 1.0
    assert consistency_score([[(1, 1)], [(2, 2)]]) == 0.0
    assert consistency_score([[], []]) == 0.0 and consistency_score([[], []], strict=True) == 0.0


def test_fact_consistency_from_stored_rows():
    rows = [
        {"fact_id": "P1/0", "relation": "P1", "method": "ig", "query_index": i, "kn": kn}
        for i, kn in enumerate([[[0, 1], [2, 3]], [[0, 1]], []])
    ]
    frame = fact_consistency(pd.DataFrame(rows))
    row = frame.iloc[0]
    assert (row.queries, row.union_size, row.cs_relaxed, row.cs_strict) == (3, 2, 0.5, 0.0)


def test_otsu_splits_a_bimodal_sample():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.1, 0.03, 500).clip(0, 1), rng.normal(0.7, 0.05, 300).clip(0, 1)
    threshold = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < threshold < high.min()
    assert 0.3 < threshold < 0.5


def test_welch_matches_scipy_and_the_formula():
    kc, ki = [0.5, 0.6, 0.9, 0.7], [0.01, 0.05, 0.02, 0.0, 0.08, 0.03]
    t, p = welch(kc, ki)
    reference = stats.ttest_ind(kc, ki, equal_var=False)
    assert (t, p) == pytest.approx((reference.statistic, reference.pvalue))
    by_hand = (np.mean(kc) - np.mean(ki)) / np.sqrt(
        np.var(kc, ddof=1) / len(kc) + np.var(ki, ddof=1) / len(ki)
    )
    assert t == pytest.approx(by_hand)
    assert np.isnan(welch([0.5], ki)[0])


def test_table1_shares_means_and_u_ki():
    table = table1(classify(hand_made_cs()))
    ig = table[(table.method == "ig") & (table.threshold == "static")].iloc[0]
    assert (ig.R_KI, ig.R_KC) == (0.5, 0.5)
    assert ig.CS_KI == pytest.approx(0.025) and ig.CS_KC == pytest.approx(0.55)
    assert ig.t == pytest.approx(stats.ttest_ind([0.5, 0.6], [0.0, 0.05], equal_var=False).statistic)
    # Facts 0..3 static classes: ig KI,KI,KC,KC; amig KI,KC,KI,KC; sig KI,KI,KI,KC -> only fact 0 all KI.
    assert ig.U_KI == pytest.approx(0.25)
    assert ig.empty_union == 1 and (table[table.method == "amig"].empty_union == 0).all()
    assert set(table.threshold) == {"static", "otsu"} and len(table) == 6


def test_ki_share_curve_and_relation_summary():
    cs = hand_made_cs()
    curve = ki_share_curve(cs)
    assert curve.threshold.min() == 0.04 and curve.threshold.max() == 0.8 and len(curve) == 3 * 39
    ig = curve[curve.method == "ig"].set_index("threshold").ki_share
    assert ig[0.04] == 0.25 and ig[0.1] == 0.5 and ig[0.8] == 1.0
    summary = relation_summary(cs, "amig")
    assert list(summary.relation) == ["P1", "P2"]
    assert summary.set_index("relation").loc["P1", "mean"] == pytest.approx((0.02 + 0.08) / 2)
    assert summary.set_index("relation").loc["P2", "ki_share"] == 0.0
    fig = violin_figure(cs, "amig")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["P1", "P2"]


def test_null_groups_queries_of_different_facts():
    # Every fact's queries share its own neuron and a format neuron (0, 0) that every query holds.
    facts = [[[[0, 0], [1, f]], [[0, 0], [1, f]], [[0, 0], [2, f]]] for f in range(6)]
    frame = fact_rows(facts)
    null = null_consistency(frame, groups=60, seed=3)
    assert len(null) == 60 and set(null["size"]) == {3}
    # A group of queries from 3 different facts shares only (0, 0): CS = 1 / (1 + 3 own neurons) ...
    # unless two drawn queries have their (2, f) / (1, f) neuron from the same fact, which they cannot.
    assert (null["cs"] == 0.25).all()
    cs = fact_consistency(frame)
    assert (cs["cs_relaxed"] == 2 / 3).all()  # (0, 0) and (1, f) are in more than one set of the fact
    classified = classify(cs, null=null)
    assert classified["above_null"].all() and (classified["cs_null_mean"] == 0.25).all()
    pd.testing.assert_frame_equal(null, null_consistency(frame, groups=60, seed=3))
    assert not null_consistency(frame, groups=60, seed=4)["cs"].isna().any()


def test_null_group_size_is_capped_by_the_number_of_facts():
    facts = [[[[0, 0]]] * 5, [[[1, 1]], [[1, 2]]]]
    null = null_consistency(fact_rows(facts), groups=10)
    assert set(null["size"]) == {2}
    assert null_consistency(fact_rows(facts[:1]), groups=10).empty  # one fact: no chance groups


def test_table1_reports_the_null_and_keeps_degenerate_methods_out_of_u_ki():
    cs = hand_made_cs()
    cs["degenerate"] = cs["method"] == "ig"
    null = pd.DataFrame(
        {"model": "m", "method": ["ig", "amig", "sig"] * 10, "size": 2, "cs": [0.04] * 15 + [0.06] * 15}
    )
    table = table1(classify(cs, null=null))
    static = table[table.threshold == "static"].set_index("method")
    assert static.loc["ig", "degenerate"] and not static.loc["amig", "degenerate"]
    # amig KI,KC,KI,KC and sig KI,KI,KI,KC: facts 0 and 2 are KI under both (ig left out).
    assert static.loc["amig", "U_KI"] == pytest.approx(0.5)
    assert {"cs_null_mean", "cs_null_p95", "R_above_null"} <= set(table)
    p95 = np.quantile(null[null.method == "sig"]["cs"], 0.95)
    sig = cs[cs.method == "sig"]["cs_relaxed"]
    assert static.loc["sig", "R_above_null"] == pytest.approx(float((sig > p95).mean()))


def test_threshold_sensitivity_recomputes_sets_per_rule():
    import torch

    from qloc.engine.attribution import kn_set

    generator = torch.Generator().manual_seed(0)
    rows = []
    for f in range(5):
        shared = torch.rand(2, 8, generator=generator)
        for q in range(3):
            scores = shared + 0.5 * torch.rand(2, 8, generator=generator)
            for rule, kn in (
                ("t=0.2", kn_set(scores, 0.2)),
                ("t=0.5", kn_set(scores, 0.5)),
                ("top10", kn_set(scores, top_k_neurons=10)),
            ):
                rows.append(
                    {
                        "model": "m",
                        "fact_id": f"P1/{f}",
                        "relation": "P1",
                        "method": "amig",
                        "query_index": q,
                        "kn": kn,
                        "kn_size": len(kn),
                        "kn_rule": rule,
                        "degenerate": False,
                    }
                )
    table = threshold_sensitivity(pd.DataFrame(rows)).set_index("kn_rule")
    assert list(table.index) == ["t=0.2", "t=0.5", "top10"]
    assert table.loc["top10", "mean_kn_size"] == 10
    assert table.loc["t=0.2", "mean_kn_size"] > table.loc["t=0.5", "mean_kn_size"]
    assert table["R_KI_static"].between(0, 1).all() and table["cs_null_mean"].notna().all()


def test_one_fact_has_table1_whose_chance_column_says_why_it_is_empty():
    """Issue 23 case 4: the empty null of a 1-fact run raised a TypeError in its quantiles."""
    study = consistency_study(fact_rows([[[(0, 1)], [(0, 1), (1, 2)]]]))
    assert study.table1["cs_null_mean"].isna().all() and study.table1["R_above_null"].isna().all()
    assert (study.table1["chance"] == NO_NULL).all() and "1 fact" in NO_NULL
    assert study.per_fact()["above_null"].isna().all()  # no null to beat, not "below chance"
