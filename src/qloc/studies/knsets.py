"""KN-set math: a fact's KN sets per method (:class:`FactKNSets`), the consistency score of a
fact's sets, the shared-neuron filter applied before editing and mapping, random neurons to compare
a set with, KN-set rules, and Consistency-Aware KN selection (METHODS.md section 8, the paper's
eq. 5), the fact-level KN set that localize stores beside the per-query ones. Reading KN sets back
from run stores is :mod:`qloc.studies.stored_knsets`; a localize run read back for the experiments
on it is :mod:`qloc.studies.localize_run`.

CAS: for a fact with per-query score tensors, s_j(u) = score_j(u) / max score_j; CAS(u) = beta1 *
mean_j s_j(u) - beta2 * var_j s_j(u); K_CAS = {u : CAS(u) >= t * max CAS}. Neurons that score
high for every paraphrase are kept, those that matter for one phrasing only are penalised.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..engine.attribution import kn_set
from ..engine.editing import Neuron
from ..errors import ConfigError, QlocError
from ..settings import setting

STATIC_THRESHOLD = 0.1
"""KC/KI split of a fact by its relaxed CS (METHODS.md section 4)."""
SHARED_FILTER = 0.10
"""Dai et al.'s filter: drop KNs held by more than this share of a relation's facts."""
SHARED_FILTER_MIN_FACTS = 50
"""Relations with fewer facts in the run count shares over all of the run's facts instead. Dai et
al. counted over relations of hundreds of facts; in a sample of 10 facts of a relation, two facts
with one answer ("French") sharing the answer's neuron already exceed 10 %, and on SmolLM2's 150
known facts (10 per relation) that rule emptied the Self set of 21 facts and dropped 549 distinct
neurons, against 4 and 89 when shares are counted over the run."""


SHARED_MIN_FACTS_HELP = (
    "Facts a relation needs for the shared-neuron filter to count shares within it (else over all the "
    "pool's facts); a pool with fewer is not filtered."
)
SHARED_REFERENCE_HELP = (
    "A localize run of the same model (KN sets cut alike) whose facts count the shared-neuron filter's "
    "shares; default: this run."
)


def reference_param(reference: Path | None) -> str | None:
    """A shared-filter reference run as a stage parameter: its absolute path."""
    return str(Path(reference).resolve()) if reference is not None else None


@dataclass
class FactKNSets:
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

    def without(self, neurons: set[Neuron] | frozenset[Neuron]) -> FactKNSets:
        """The same KN sets with ``neurons`` removed (the fact's class stays that of the original)."""
        return FactKNSets(
            [[u for u in s if u not in neurons] for s in self.query_sets],
            [u for u in self.cas if u not in neurons],
            self.relation,
        )


def random_neurons(
    count: int, shape: tuple[int, int], avoid: set[Neuron] | frozenset[Neuron], rng: random.Random
) -> list[Neuron]:
    """``count`` distinct neurons of a (layers, d_ff) model outside ``avoid``, drawn with ``rng``
    (fewer where fewer are free): the unrelated neurons a set is compared with."""
    free = shape[0] * shape[1] - len(avoid)
    chosen: set[Neuron] = set()
    while len(chosen) < min(count, free):
        candidate = (rng.randrange(shape[0]), rng.randrange(shape[1]))
        if candidate not in avoid:
            chosen.add(candidate)
    return sorted(chosen)


@dataclass(frozen=True)
class ManipulationConfig:
    """The parameters every experiment shares that suppresses and enhances units of a localize
    run's queries (mapping, synapses); its stage is named after it and the KN sets' method."""

    stage_name: ClassVar[str]
    method: str = setting("ig", hidden=True)
    """Whose KN sets (from the localize run) are the query's KNs."""
    suppress: float = setting(0.0, hidden=True)
    enhance: float = setting(2.0, hidden=True)
    static_threshold: float = setting(STATIC_THRESHOLD, hidden=True)
    """KC/KI split of the fact (relaxed CS), as in the consistency study."""
    seed: int = setting(0)

    @property
    def stage(self) -> str:
        return f"{self.stage_name}-{self.method}"

    def params(self) -> dict[str, Any]:
        return asdict(self)


def check_share(share: float | None, setting: str = "shared_filter") -> None:
    """A filter's share (shared-neuron, activity): in (0, 1], or None (off)."""
    if share is not None and not 0 < share <= 1:
        raise ConfigError.invalid(setting, share, "a share in (0, 1], or off")


def shared_neurons(
    knowledge: Mapping[str, FactKNSets],
    share: float = SHARED_FILTER,
    min_facts: int = SHARED_FILTER_MIN_FACTS,
    pool: Mapping[str, FactKNSets] | None = None,
) -> dict[str, frozenset[Neuron]]:
    """Per fact id of ``knowledge``, the neurons the shared-neuron filter removes: those held (in any
    query's KN set) by more than ``share`` of the ``pool``'s facts (default: ``knowledge`` itself) of
    the fact's relation, or of all the pool's facts where the relation has fewer than ``min_facts``
    there, and by at least two facts (a neuron of one fact is not shared). Such neurons fire for the
    relation, the prompt format or every token (a last-layer neuron in 59 % of SmolLM2's KN sets),
    not for a fact. A pool of fewer than ``min_facts`` facts cannot estimate a share (on 12 facts,
    "more than 10 %" means "two facts", and the filter emptied 5 of 12 Self sets): nothing is removed."""
    check_share(share, "share")
    pool = knowledge if pool is None else pool
    if len(pool) < min_facts:
        return {fact_id: frozenset() for fact_id in knowledge}
    overall: Counter = Counter()
    by_relation: dict[str, Counter] = {}
    facts_in: Counter = Counter()
    for known in pool.values():
        neurons = known.neurons
        overall.update(neurons)
        by_relation.setdefault(known.relation, Counter()).update(neurons)
        facts_in[known.relation] += 1
    cache: dict[str, frozenset[Neuron]] = {}
    dropped: dict[str, frozenset[Neuron]] = {}
    for fact_id, known in knowledge.items():
        relation = known.relation
        if relation not in cache:
            local = facts_in[relation] >= min_facts
            counts, total = (by_relation[relation], facts_in[relation]) if local else (overall, len(pool))
            cache[relation] = frozenset(u for u, c in counts.items() if c > max(1.0, share * total))
        dropped[fact_id] = cache[relation] & known.neurons
    return dropped


@dataclass(frozen=True)
class SharedNeuronFilter:
    """Dai et al.'s shared-neuron filter as an experiment applies it before editing or mapping:
    its share (None: off), and the facts whose KN sets count the shares (the run's own, or a
    larger reference run of the same model, METHODS.md section 5).

    Args:
        share: drop KNs held by more than this share of the pool's facts; None turns it off.
        pool: per fact id, the KN sets that count the shares.
        pool_name: the pool in words, for the report ("this run", "reference run DIR").
        min_facts: the facts a relation (else the whole pool) needs to count shares within it.
    """

    share: float | None
    pool: Mapping[str, FactKNSets]
    pool_name: str = "this run"
    min_facts: int = SHARED_FILTER_MIN_FACTS

    def removed(self, knowledge: Mapping[str, FactKNSets]) -> dict[str, frozenset[Neuron]]:
        """Per fact id, the neurons the filter takes out of its KN sets."""
        if self.share is None:
            return {fact_id: frozenset() for fact_id in knowledge}
        return shared_neurons(knowledge, self.share, self.min_facts, self.pool)

    def apply(self, knowledge: Mapping[str, FactKNSets]) -> dict[str, FactKNSets]:
        """The KN sets after the filter (each fact keeps the class of its unfiltered sets)."""
        removed = self.removed(knowledge)
        return {fact_id: known.without(removed[fact_id]) for fact_id, known in knowledge.items()}

    def report(
        self, knowledge: Mapping[str, FactKNSets], sets: Sequence[str] = ("self", "union", "cas")
    ) -> str:
        """What the filter removes from ``knowledge``, in words: whence its shares, the distinct
        neurons it drops, and per KN set how many KNs it removed and how many sets it emptied."""
        if self.share is None:
            return "shared-neuron filter off"
        if len(self.pool) < self.min_facts:
            return (
                f"shared-neuron filter {self.share:g} not applied: {self.pool_name} has "
                f"{len(self.pool):,} facts, fewer than the {self.min_facts} a share needs "
                "(--shared-reference takes a larger localize run of the model)"
            )
        removed = self.removed(knowledge)
        distinct = set().union(*removed.values()) if removed else set()
        per_set = []
        for name in sets:
            before = {fact_id: known.kn_set(name) for fact_id, known in knowledge.items()}
            after = {
                fact_id: [u for u in kns if u not in removed[fact_id]] for fact_id, kns in before.items()
            }
            dropped = sum(len(before[f]) - len(after[f]) for f in before)
            emptied = sum(1 for f in before if before[f] and not after[f])
            per_set.append(f"{name} {dropped:,} KNs, {emptied:,} of {len(before):,} sets emptied")
        return (
            f"shared-neuron filter {self.share:g} (shares over {len(self.pool):,} facts of "
            f"{self.pool_name}): drops {len(distinct):,} distinct neurons ({'; '.join(per_set)})"
        )


def cas_scores(
    per_query_scores: Sequence[torch.Tensor], beta1: float = 1.0, beta2: float = 1.0
) -> torch.Tensor:
    """CAS(u) for every neuron: [L, d_ff] from the fact's per-query [L, d_ff] scores."""
    stacked = torch.stack(
        [s / s.max() if float(s.max()) > 0 else torch.zeros_like(s) for s in per_query_scores]
    ).float()
    return beta1 * stacked.mean(0) - beta2 * stacked.var(0, unbiased=False)


CAS_THRESHOLD = 0.3
"""K_CAS: the neurons whose CAS reaches this share of the fact's best (METHODS.md section 8)."""


def cas_set(
    per_query_scores: Sequence[torch.Tensor],
    beta1: float = 1.0,
    beta2: float = 1.0,
    threshold: float = CAS_THRESHOLD,
) -> list[tuple[int, int]]:
    """K_CAS = {u : CAS(u) >= threshold * max CAS}."""
    return kn_set(cas_scores(per_query_scores, beta1, beta2), threshold)


def consistency_score(kn_sets: Sequence[Iterable], strict: bool = False, min_count: int = 2) -> float:
    """CS of one fact: the share of the union of its queries' KN sets held by at least ``min_count``
    of them (relaxed, METHODS.md section 4: 2); strict = held by all of them (|intersection| /
    |union|). 0 where the union is empty."""
    sets = [set(map(tuple, s)) for s in kn_sets]
    union = set().union(*sets) if sets else set()
    if not union:
        return 0.0
    need = len(sets) if strict else min_count
    counts: dict[tuple, int] = {}
    for s in sets:
        for neuron in s:
            counts[neuron] = counts.get(neuron, 0) + 1
    return sum(1 for c in counts.values() if c >= need) / len(union)


KN_RULES = ("t=0.1", "t=0.2", "t=0.3", "t=0.5", "top10", "top50")
"""KN-set rules of the threshold-sensitivity table: score >= t x max, or the k best neurons."""


def kn_set_by_rule(scores: torch.Tensor, rule: str) -> list[tuple[int, int]]:
    """The KN set of ``scores`` under a rule of :data:`KN_RULES`."""
    if rule.startswith("top"):
        return kn_set(scores, top_k_neurons=int(rule.removeprefix("top")))
    return kn_set(scores, float(rule.removeprefix("t=")))
