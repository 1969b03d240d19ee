"""The census (what a model knows) and the --known filter: scores against plain forward passes,
length bucketing, resume, the filter's choice of facts and queries, and the query an edit edits."""

import pytest

import qloc
from qloc.engine.cloze import FirstTokenScorer
from qloc.studies.census import (
    calibration_sample,
)
from tests.helpers import token_ids


@pytest.mark.real_model
def test_bfloat16_census_keeps_top1_and_top10_membership(smollm2):
    facts = qloc.sample_facts(qloc.load_pararel().facts, ["P36", "P103", "P1412", "P19"], 6, seed=3)
    pairs = [(q, f.object) for f in facts for q in f.queries]
    prompts, answers = token_ids(smollm2, pairs)
    others = qloc.sample_facts(qloc.load_pararel().facts, None, 1, seed=9)
    calibration = list(zip(*token_ids(smollm2, calibration_sample(others, 64))))
    exact = FirstTokenScorer(smollm2, "float32").score(prompts, answers)
    fast = FirstTokenScorer(smollm2, "bfloat16", calibration=calibration).score(prompts, answers)
    assert sum(s.rank < 10 for s in exact) >= 5  # the comparison covers known queries
    assert [s.rank == 0 for s in fast] == [s.rank == 0 for s in exact]
    assert [s.rank < 10 for s in fast] == [s.rank < 10 for s in exact]
    for f, e in zip(fast, exact):
        if f.rank < 10 or e.rank < 10:
            assert f.scored_in == "float32" and f.rank == e.rank and f.prob == pytest.approx(e.prob, rel=1e-5)
