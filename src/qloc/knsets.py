"""KN sets of a localize run, per fact, as the editing and mapping experiments read them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from .consistency import consistency_score
from .errors import QlocError


@dataclass
class FactKnowledge:
    """What the localize run knows of one fact for one method."""

    query_sets: list[list[tuple[int, int]]]  # per query index
    cas: list[tuple[int, int]]

    def kn_set(self, name: str) -> list[tuple[int, int]]:
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


def knowledge_from_store(kn_frame: pd.DataFrame, cas_frame: pd.DataFrame, method: str) -> dict[str, FactKnowledge]:
    """Per fact id, the KN sets the localize run stored for ``method``."""
    kn_frame = kn_frame[kn_frame["method"] == method]
    if kn_frame.empty:
        raise QlocError(f"the localize run has no KN sets for method {method!r}")
    cas = {row.fact_id: [tuple(u) for u in json.loads(row.kn)] for row in cas_frame[cas_frame["method"] == method].itertuples()}
    result = {}
    for fact_id, group in kn_frame.groupby("fact_id", sort=False):
        sets = [[tuple(u) for u in json.loads(k)] for k in group.sort_values("query_index")["kn"]]
        result[fact_id] = FactKnowledge(sets, cas.get(fact_id, []))
    return result
