"""Consistency-Aware KN selection (METHODS.md section 8) on hand-made scores."""

import pytest
import torch

from qloc.studies.knsets import cas_scores, cas_set


def test_cas_rewards_neurons_every_query_uses():
    a = torch.tensor([[4.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # max 4
    b = torch.tensor([[2.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # max 2
    scores = cas_scores([a, b])
    # normalised: a -> [[1, .5, 0], [0, 0, .25]], b -> [[1, 0, 1], [0, 0, 0]]
    expected_mean = torch.tensor([[1.0, 0.25, 0.5], [0.0, 0.0, 0.125]])
    expected_var = torch.tensor([[0.0, 0.0625, 0.25], [0.0, 0.0, 0.015625]])
    torch.testing.assert_close(scores, expected_mean - expected_var)
    # CAS = [[1, .1875, .25], [0, 0, .109375]]: >= 0.3 * max keeps only the neuron both queries use.
    assert cas_set([a, b]) == [(0, 0)]
    assert cas_set([a, b], threshold=0.2) == [(0, 0), (0, 2)]
    # Without the variance penalty (0, 2), high for one query only, ranks above (0, 1).
    assert cas_set([a, b], beta2=0.0, threshold=0.2) == [(0, 0), (0, 1), (0, 2)]


def test_cas_of_identical_queries_is_their_normalised_score():
    a = torch.tensor([[3.0, 1.5], [0.3, 0.0]])
    torch.testing.assert_close(cas_scores([a, a, a]), a / 3)
    with pytest.raises(RuntimeError):
        cas_scores([])
