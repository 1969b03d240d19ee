"""KN consistency: scores on hand-made KN sets, Otsu, Welch, Table 1, plot data, and a localize
sweep killed midway that resumes to the same tables."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qloc.store import RunStore
from qloc.consistency import (
    classify, consistency_score, fact_consistency, ki_share_curve, otsu_threshold, relation_summary, table1,
    violin_figure, welch,
)
from test_store import kill_midway


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
        {"fact_id": "P1/0", "relation": "P1", "method": "ig", "query_index": i, "kn": json.dumps(kn)}
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
    by_hand = (np.mean(kc) - np.mean(ki)) / np.sqrt(np.var(kc, ddof=1) / len(kc) + np.var(ki, ddof=1) / len(ki))
    assert t == pytest.approx(by_hand)
    assert np.isnan(welch([0.5], ki)[0])


def hand_made_cs():
    rows = []
    values = {"ig": [0.0, 0.05, 0.5, 0.6], "amig": [0.02, 0.5, 0.08, 0.7], "sig": [0.01, 0.03, 0.09, 0.9]}
    for method, cs in values.items():
        for i, v in enumerate(cs):
            rows.append({"model": "m", "fact_id": f"P{i % 2 + 1}/{i}", "relation": f"P{i % 2 + 1}", "method": method,
                         "cs_relaxed": v, "cs_strict": v / 2, "union_size": 0 if v == 0 else 3})
    return pd.DataFrame(rows)


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


def _localize(model_dir, run_dir):
    return [sys.executable, "-m", "qloc.cli", "localize", "--model", str(model_dir), "--run-dir", str(run_dir),
            "--facts-per-relation", "1", "--methods", "ig,amig", "--steps", "3", "--device", "cpu", "--quiet"]


def test_killed_sweep_resumes_to_the_same_tables(tmp_path, tiny_model_dir):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert 3 <= kill_midway(_localize(tiny_model_dir, killed), killed, 3) < 31
    for run in (killed, clean):
        subprocess.run(_localize(tiny_model_dir, run), check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "qloc.cli", "consistency", "--run-dir", str(run)], check=True, capture_output=True)
    for name in ("table1.csv", "consistency.csv"):
        resumed = pd.read_csv(killed / "tables" / name).sort_values(list(pd.read_csv(killed / "tables" / name).columns[:4]))
        uninterrupted = pd.read_csv(clean / "tables" / name).sort_values(list(resumed.columns[:4]))
        pd.testing.assert_frame_equal(resumed.reset_index(drop=True), uninterrupted.reset_index(drop=True))
    assert (killed / "figures" / "violin_ig.png").stat().st_size > 10_000
    assert (killed / "figures" / "fig9_threshold.svg").exists()


def test_demo_runs_the_main_job(tmp_path, tiny_model_dir):
    run = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "qloc.cli", "demo", "--model", str(tiny_model_dir), "--facts", "3",
                             "--methods", "ig", "--known", "1000", "--run-dir", str(run), "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model | method | threshold |" in result.stdout
    table = pd.read_csv(run / "tables" / "table1.csv")
    assert set(table.threshold) == {"static", "otsu"} and (table.facts == 3).all()
    assert (run / "figures" / "violin_ig.svg").exists()
    with RunStore.open_existing(run) as store:  # the facts are known ones, from a census of 64 per relation
        assert store.params("census")["facts_per_relation"] == 64 and store.params("localize")["known"] == 1000


@pytest.mark.parametrize("option", [["--rule", "simpson"], ["--answer-tokens", "last"], ["--steps", "0"], ["--top-k", "0"],
                                    ["--methods", "ig,lrp"]])
def test_bad_localize_options_are_refused_before_anything_is_stored(tmp_path, option):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qloc.cli", "localize", "--model", "no-model-needed", "--run-dir", str(run),
                             *option], capture_output=True, text=True)
    assert result.returncode == 2 and option[1] in result.stderr and "Traceback" not in result.stderr
    assert not (run / "qloc.sqlite").exists()
