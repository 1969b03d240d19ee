"""Method agreement (``qloc agreement``): the per-query measures on hand-made scores, and the whole
tool on a tiny localize run made with --save-scores."""

import math

import pandas as pd
import pytest
import torch

from qloc.data.selection import Selection
from qloc.engine.attribution import AttributionSettings, kn_set
from qloc.errors import QlocError
from qloc.runs.executors import Execution
from qloc.studies import localize
from qloc.studies.agreement import (
    hybrid_measures,
    method_agreement,
    overlap,
    query_agreement,
    write_method_agreement,
)


def test_overlap_and_query_measures():
    assert overlap([(0, 1), (1, 2)], [(1, 2), (2, 0)]) == (pytest.approx(1 / 3), 0.5)
    assert overlap([], []) == (1.0, pytest.approx(float("nan"), nan_ok=True))
    scores = torch.tensor([[4.0, 3.0, 2.0], [1.0, 0.0, -1.0]])
    same = query_agreement(scores, kn_set(scores), scores, kn_set(scores), overlap_k=2)
    assert {k: same[k] for k in ("jaccard", "recall", "same_kn_set", "spearman", "top2_overlap")} == {
        "jaccard": 1.0,
        "recall": 1.0,
        "same_kn_set": 1.0,
        "spearman": 1.0,
        "top2_overlap": 1.0,
    }
    reversed_ = query_agreement(scores, kn_set(scores), -scores, kn_set(-scores), overlap_k=2)
    assert reversed_["spearman"] == pytest.approx(-1) and reversed_["top2_overlap"] == 0
    assert reversed_["jaccard"] == 0 and reversed_["same_kn_set"] == 0
    flat = query_agreement(torch.zeros(2, 3), [], scores, kn_set(scores))
    assert math.isnan(flat["spearman"]) and flat["recall"] == 0


def test_hybrid_measures_read_the_reference_on_the_marked_layers():
    reference = torch.zeros(4, 3)
    reference[1, 0], reference[1, 2], reference[3, 1] = 1.0, 0.5, 0.3
    reference_set = kn_set(reference)  # (1, 0), (1, 2), (3, 1)
    only_layer_1 = hybrid_measures([(1, 1)], reference, reference_set)
    # Rows at layer l run L - l = 4 - l layers: layer 1's share is 3 / (4 + 3 + 2 + 1).
    assert only_layer_1 == {
        "marked_layers": 1,
        "hybrid_recall": pytest.approx(2 / 3),
        "hybrid_exact": 0.0,
        "hybrid_cost": pytest.approx(0.3),
    }
    both = hybrid_measures([(1, 1), (3, 0), (3, 2)], reference, reference_set)
    assert both["hybrid_exact"] == 1.0 and both["hybrid_cost"] == pytest.approx(0.4)
    # Every KN inside, but the top score outside: the threshold would be relative to another max.
    assert hybrid_measures([(3, 0)], reference, [(3, 1)])["hybrid_exact"] == 0.0


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("agreement") / "run"
    localize.run(
        localize.LocalizeRequest(
            run_dir=run_dir,
            model=str(tiny_model_dir),
            config=localize.LocalizeConfig(
                methods=("ig", "amig"), attribution=AttributionSettings(steps=2), save_scores=True
            ),
            selection=Selection(relations="P19,P36", facts_per_relation=1),
            device="cpu",
            execution=Execution(quiet=True),
        )
    )
    return run_dir


def test_agreement_on_a_tiny_run(saved_run, tmp_path):
    agreement = method_agreement([saved_run], "gxa", ("ig", "amig"), overlap_k=10, device="cpu")
    queries, facts, summary = agreement.queries, agreement.facts, agreement.summary
    assert set(queries["reference"]) == {"ig", "amig"} and set(queries["method"]) == {"gxa"}
    assert (queries.groupby("reference").size() == len(queries) / 2).all()
    for column in ("jaccard", "same_kn_set", "top10_overlap"):
        assert queries[column].between(0, 1).all()
    assert queries["spearman"].dropna().between(-1, 1).all()
    assert len(facts) == 2 * 2 and set(facts["reference"]) == {"ig", "amig"}
    assert facts["agree_static"].isin([True, False]).all() and facts["agree_otsu"].isin([True, False]).all()
    ig = summary.set_index("reference").loc["ig"]
    assert ig["queries"] == len(queries) / 2 and ig["facts"] == 2
    assert ig["jaccard_mean"] == pytest.approx(queries[queries.reference == "ig"]["jaccard"].mean())
    assert ig["speedup_vs_stored"] > 0
    written = write_method_agreement(agreement, tmp_path, overlap_k=10)
    stored = pd.read_csv(written["queries"])
    assert (
        len(stored) == len(queries) and (tmp_path / "figures" / "method_agreement.png").stat().st_size > 5000
    )
    assert written["summary"].with_suffix(".md").exists() and written["facts"].exists()


def test_first_order_of_one_step_runs_agrees_exactly(tmp_path, tiny_model_dir):
    """At steps 1 with the right rule IG is gxa: every KN set and class agrees, and the ranks up to
    the stored fp16 scores' rounding (a tiny model's scores are subnormal there: ties)."""
    run_dir = tmp_path / "one-step"
    localize.run(
        localize.LocalizeRequest(
            run_dir=run_dir,
            model=str(tiny_model_dir),
            config=localize.LocalizeConfig(
                methods=("ig",), attribution=AttributionSettings(steps=1), save_scores=True
            ),
            selection=Selection(relations="P19", facts_per_relation=1),
            device="cpu",
            execution=Execution(quiet=True),
        )
    )
    agreement = method_agreement([run_dir], "gxa", ("ig",), device="cpu")
    assert (agreement.queries["jaccard"] == 1).all() and (agreement.queries["spearman"] > 0.99).all()
    assert agreement.facts["agree_static"].all() and agreement.facts["agree_otsu"].all()


def test_runs_without_dense_scores_or_references_are_refused(saved_run, tmp_path, tiny_model_dir):
    with pytest.raises(QlocError, match="sig"):
        method_agreement([saved_run], "gxa", ("sig",), device="cpu")
    with pytest.raises(QlocError, match="gxa"):
        method_agreement([saved_run], "gxa", ("gxa",), device="cpu")
    bare = tmp_path / "bare"
    localize.run(
        localize.LocalizeRequest(
            run_dir=bare,
            model=str(tiny_model_dir),
            config=localize.LocalizeConfig(methods=("ig",), attribution=AttributionSettings(steps=1)),
            selection=Selection(relations="P19", facts_per_relation=1),
            device="cpu",
            execution=Execution(quiet=True),
        )
    )
    with pytest.raises(QlocError, match="--save-scores"):
        method_agreement([bare], "gxa", ("ig",), device="cpu")
