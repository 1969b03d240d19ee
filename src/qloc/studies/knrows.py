"""The rows of the localize stage: one query's KN set (``kn_sets``), its dense scores
(``dense_scores``) and a fact's Consistency-Aware KN set (``cas_sets``), and the query row that
other stages' rows extend. Studies read them back through these classes (:meth:`RunStore.rows`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..runs.rows import Row


@dataclass
class QueryRow(Row):
    """A result row about one query of a fact, for one method's KN sets."""

    fact_id: str
    relation: str
    method: str
    query_index: int
    prompt: str
    answer: str


@dataclass
class KnSetRow(QueryRow):
    """One query's KN set for one method, its best scores, and what the attribution measured."""

    table = "kn_sets"
    kn: list[list[int]]
    kn_size: int
    max_score: float
    top: list[list[float]]
    """The query's best (layer, neuron, score)."""
    prob: float
    rank: int
    f_input: float
    max_residual: float
    seconds: float
    """Seconds the query's attribution took; a first-order method's share of its fact's batches."""


@dataclass
class DenseScoresRow(Row):
    table = "dense_scores"
    fact_id: str
    method: str
    query_index: int
    scores_npz: bytes
    """[L, d_ff] fp16 scores (:func:`qloc.studies.stored_knsets.load_dense_scores`)."""


@dataclass
class CasSetRow(Row):
    """One fact's Consistency-Aware KN set for one method."""

    table = "cas_sets"
    fact_id: str
    relation: str
    method: str
    kn: list[list[int]]
    kn_size: int
