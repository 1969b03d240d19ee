"""The attribution engine against the plain per-layer reference of METHODS.md section 3."""

import warnings

import pytest
import torch

from qloc.engine.attribution import attribute
from qloc.testing import reference_scores
from tests.helpers import assert_equivalent


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["ig", "amig"])
def test_engine_equals_reference_on_smollm2(smollm2, method):
    prompt, answer = "The capital of France is", "Paris"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = attribute(smollm2, prompt, answer, method, steps=8)
    assert_equivalent(result.scores, reference_scores(smollm2, prompt, answer, method, steps=8))


@pytest.mark.real_model
def test_sig_equals_reference_on_smollm2(smollm2):
    prompt, answer = "Rome is the capital of", "Italy"
    result = attribute(smollm2, prompt, answer, "sig", steps=4)
    assert_equivalent(result.scores, reference_scores(smollm2, prompt, answer, "sig", steps=4))


@pytest.mark.real_model
def test_smollm2_eiffel_layer0_shows_right_rule_incompleteness(smollm2):
    """The issue's example: at 20 steps the right Riemann sum of layer 0 overshoots F(input) -
    F(baseline) (1.16 against 0.70) because of SmolLM2's massive activations; qloc reports it."""
    with pytest.warns(UserWarning, match="raise steps"):
        result = attribute(smollm2, "The Eiffel Tower is located in the city of", "Paris", "ig", steps=20)
    assert float(result.f_input[0]) == pytest.approx(0.70, abs=0.01)
    assert float(result.scores[0].sum()) == pytest.approx(1.16, abs=0.03)
    assert float(result.completeness_residual[0, 0]) > 0.3


@pytest.mark.real_model
def test_same_query_gives_identical_scores_twice(smollm2):
    first = attribute(smollm2, "The capital of France is", "Paris", "amig", steps=6)
    second = attribute(smollm2, "The capital of France is", "Paris", "amig", steps=6)
    assert torch.equal(first.scores, second.scores)
