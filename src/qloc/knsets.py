"""KN sets of a localize run, per fact, as the editing and mapping experiments read them, and the
shared-neuron filter applied before those experiments."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from .consistency import consistency_score
from .errors import QlocError

Neuron = tuple[int, int]
SHARED_FILTER = 0.10
"""Dai et al.'s filter: drop KNs held by more than this share of a relation's facts."""
SHARED_FILTER_MIN_FACTS = 50
"""Relations with fewer facts in the run count shares over all of the run's facts instead. Dai et
al. counted over relations of hundreds of facts; in a sample of 10 facts of a relation, two facts
with one answer ("French") sharing the answer's neuron already exceed 10 %, and on SmolLM2's 150
known facts (10 per relation) that rule emptied the Self set of 21 facts and dropped 549 distinct
neurons, against 4 and 89 when shares are counted over the run."""


@dataclass
class FactKnowledge:
    """What the localize run knows of one fact for one method."""

    query_sets: list[list[Neuron]]  # per query index
    cas: list[Neuron]
    relation: str = ""

    def kn_set(self, name: str) -> list[Neuron]:
        if name == "self":
            return self.query_sets[0]
        if name == "union":
            return sorted(set().union(*map(set, self.query_sets)))
        if name == "cas":
            return self.cas
        raise QlocError(f"unknown KN set {name!r}: choose self, union or cas")

    def knowledge_class(self, threshold: float) -> str:
        """KC where the fact's relaxed CS reaches ``threshold``, else KI (METHODS.md section 4)."""
        return "KC" if self.consistency >= threshold else "KI"

    @property
    def consistency(self) -> float:
        return consistency_score(self.query_sets)

    @property
    def neurons(self) -> set[Neuron]:
        """Every neuron in any of the fact's query KN sets."""
        return set().union(*map(set, self.query_sets))

    def without(self, neurons: set[Neuron] | frozenset[Neuron]) -> FactKnowledge:
        """The same KN sets with ``neurons`` removed (the fact's class stays that of the original)."""
        return FactKnowledge([[u for u in s if u not in neurons] for s in self.query_sets],
                             [u for u in self.cas if u not in neurons], self.relation)


def shared_neurons(
    knowledge: Mapping[str, FactKnowledge], share: float = SHARED_FILTER, min_facts: int = SHARED_FILTER_MIN_FACTS
) -> dict[str, frozenset[Neuron]]:
    """Per fact id, the neurons the shared-neuron filter removes: those held (in any query's KN set)
    by more than ``share`` of the facts of the fact's relation in the run, or of all the run's
    facts where the relation has fewer than ``min_facts``, and by at least two facts (a neuron of
    one fact is not shared, however small the run). Such neurons fire for the relation, the prompt
    format or every token (a last-layer neuron in 59 % of SmolLM2's KN sets), not for a fact."""
    if not 0 < share <= 1:
        raise QlocError(f"shared-neuron filter share {share}: must be in (0, 1]")
    held = {fact_id: known.neurons for fact_id, known in knowledge.items()}
    overall = Counter(u for neurons in held.values() for u in neurons)
    by_relation: dict[str, Counter] = {}
    facts_in: Counter = Counter()
    for fact_id, known in knowledge.items():
        by_relation.setdefault(known.relation, Counter()).update(held[fact_id])
        facts_in[known.relation] += 1
    dropped: dict[str, frozenset[Neuron]] = {}
    cache: dict[str, frozenset[Neuron]] = {}
    for fact_id, known in knowledge.items():
        relation = known.relation
        if relation not in cache:
            local = facts_in[relation] >= min_facts
            counts, total = (by_relation[relation], facts_in[relation]) if local else (overall, len(knowledge))
            cache[relation] = frozenset(u for u, c in counts.items() if c > max(1.0, share * total))
        dropped[fact_id] = cache[relation] & held[fact_id]
    return dropped


def filtered_knowledge(
    knowledge: Mapping[str, FactKnowledge], share: float | None, min_facts: int = SHARED_FILTER_MIN_FACTS
) -> dict[str, FactKnowledge]:
    """The KN sets after the shared-neuron filter (``share`` None: unfiltered)."""
    if share is None:
        return dict(knowledge)
    removed = shared_neurons(knowledge, share, min_facts)
    return {fact_id: known.without(removed[fact_id]) for fact_id, known in knowledge.items()}


def knowledge_from_store(kn_frame: pd.DataFrame, cas_frame: pd.DataFrame, method: str) -> dict[str, FactKnowledge]:
    """Per fact id, the KN sets the localize run stored for ``method``."""
    kn_frame = kn_frame[kn_frame["method"] == method]
    if kn_frame.empty:
        raise QlocError(f"the localize run has no KN sets for method {method!r}")
    cas = {row.fact_id: [tuple(u) for u in json.loads(row.kn)] for row in cas_frame[cas_frame["method"] == method].itertuples()}
    result = {}
    for fact_id, group in kn_frame.groupby("fact_id", sort=False):
        sets = [[tuple(u) for u in json.loads(k)] for k in group.sort_values("query_index")["kn"]]
        result[fact_id] = FactKnowledge(sets, cas.get(fact_id, []), str(group["relation"].iloc[0]))
    return result
