"""Consistency-Aware KN selection (METHODS.md section 8, the paper's eq. 5).

For a fact with per-query score tensors, s_j(u) = score_j(u) / max score_j; CAS(u) = beta1 *
mean_j s_j(u) - beta2 * var_j s_j(u); K_CAS = {u : CAS(u) >= t * max CAS}. Neurons that score
high for every paraphrase are kept, those that matter for one phrasing only are penalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attribution import kn_set


def cas_scores(
    per_query_scores: Sequence[torch.Tensor], beta1: float = 1.0, beta2: float = 1.0
) -> torch.Tensor:
    """CAS(u) for every neuron: [L, d_ff] from the fact's per-query [L, d_ff] scores."""
    stacked = torch.stack(
        [s / s.max() if float(s.max()) > 0 else torch.zeros_like(s) for s in per_query_scores]
    ).float()
    return beta1 * stacked.mean(0) - beta2 * stacked.var(0, unbiased=False)


def cas_set(
    per_query_scores: Sequence[torch.Tensor], beta1: float = 1.0, beta2: float = 1.0, threshold: float = 0.3
) -> list[tuple[int, int]]:
    """K_CAS = {u : CAS(u) >= threshold * max CAS}."""
    return kn_set(cas_scores(per_query_scores, beta1, beta2), threshold)
