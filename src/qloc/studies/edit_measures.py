"""How the editing study edits a fact and measures the edit (METHODS.md section 5): its config, the
case drawn for each fact (the new object of an update, the unrelated queries for Loc), the scores
measured before and after, the metrics (Rel, Gen, Loc, Avg) and the evidence each edit row keeps;
sequential editing (Table 7) and the case study (Table 8)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data.pararel import Fact
from ..data.wikitext import wikitext_passages
from ..engine.attribution import DEFAULT_STEPS, attribute, kn_set
from ..engine.cloze import ClozeScore, score_cloze
from ..engine.editing import (
    EDIT_SIGNS,
    LAMBDA1,
    LAMBDA2,
    activation_signs,
    edit_knowledge,
    most_active,
    neuron_footprints,
    perplexity,
    target_activations,
    value_norms,
)
from ..engine.models import LoadedModel
from ..engine.tokens import pad_token_id
from ..errors import ConfigError
from ..runs.rows import Row, UnitWriter
from ..runs.sweep import SkipFact, WorkFn
from ..settings import setting
from .knsets import (
    SHARED_FILTER,
    SHARED_FILTER_MIN_FACTS,
    SHARED_MIN_FACTS_HELP,
    SHARED_REFERENCE_HELP,
    STATIC_THRESHOLD,
    FactKNSets,
    Neuron,
    SharedNeuronFilter,
    cas_set,
    check_share,
    random_neurons,
    reference_param,
)

KN_SETS = ("self", "union", "cas")
CONTROL_SET = "random"
"""The control an edit's KN sets are compared with: as many random neurons as the fact's (filtered)
Self set, outside all of the fact's KNs, edited the same way."""
EDIT_SETS = (*KN_SETS, CONTROL_SET)
MODES = ("erase", "update")
ACTIVITY_FILTER: float | None = None
"""The activity filter's default share of the model's neurons (None: off; METHODS.md section 5)."""
ACTIVITY_PASSAGES = 10
"""WikiText passages the activity filter measures neuron activity on."""


METRICS = ["rel", "gen", "loc", "avg", "dppl"]


CATASTROPHIC_DPPL = 1.0
"""An edit that more than doubles WikiText perplexity has broken the model, whatever it did to the fact."""


@dataclass(frozen=True)
class EditConfig:
    """The edit stages' parameters."""

    mode: str = setting("erase", hidden=True)
    sets: tuple[str, ...] = setting(
        KN_SETS, "KN sets to edit through: self, union, cas, and random (a control of non-KN neurons)."
    )
    method: str = setting("ig", hidden=True)
    lambda1: float = setting(LAMBDA1, "Weight of the old answer's removal (Dai et al.: 1).")
    lambda2: float = setting(
        LAMBDA2, "Weight of the new answer's addition (Dai et al.: 8, which breaks gated-MLP models)."
    )
    unrelated_queries: int = setting(10, hidden=True)
    ppl_passages: int = setting(5, hidden=True)
    ppl_tokens: int = setting(256, hidden=True)
    static_threshold: float = setting(STATIC_THRESHOLD, hidden=True)
    seed: int = setting(0)
    edit_sign: str = setting(
        "activation",
        "activation: each KN's change times the sign of its activation (gated MLPs have negative ones); "
        "none: the literal equation.",
    )
    shared_filter: float | None = setting(SHARED_FILTER, word="off")
    """Drop KNs held by more than this share of the relation's facts before editing; None: off."""
    shared_min_facts: int = setting(SHARED_FILTER_MIN_FACTS, SHARED_MIN_FACTS_HELP)
    shared_reference: Path | None = setting(None, SHARED_REFERENCE_HELP)
    activity_filter: float | None = setting(
        ACTIVITY_FILTER,
        "Leave out of every edit the neurons among this share of the model's with the largest "
        "||v|| x mean |activation| on WikiText (written into every token; METHODS.md section 5), or off.",
        word="off",
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError.invalid("mode", self.mode, "choose erase or update")
        unknown = [s for s in self.sets if s not in EDIT_SETS]
        if unknown or not self.sets:
            raise ConfigError.invalid("sets", ",".join(self.sets), f"choose from {', '.join(EDIT_SETS)}")
        if self.edit_sign not in EDIT_SIGNS:
            raise ConfigError.invalid("edit_sign", self.edit_sign, f"choose {' or '.join(EDIT_SIGNS)}")
        check_share(self.shared_filter)
        check_share(self.activity_filter, "activity_filter")

    @property
    def stage(self) -> str:
        return f"edit-{self.mode}-{self.method}"

    def params(self) -> dict:
        params = {
            **asdict(self),
            "sets": list(self.sets),
            "shared_reference": reference_param(self.shared_reference),
        }
        if self.activity_filter is None:  # so that runs stored before the filter existed resume
            del params["activity_filter"]
        return params


@dataclass
class EditCase:
    """One fact's edit: the new object (updates) and the unrelated queries for Loc, drawn with a
    seed per fact so that single and sequential editing use the same ones."""

    fact: Fact
    mode: str
    new_object: str | None
    unrelated: list[tuple[str, str]]

    @classmethod
    def draw(
        cls, fact: Fact, config: EditConfig, by_relation: dict[str, list[Fact]], dataset: list[Fact]
    ) -> EditCase:
        rng = random.Random(f"{config.seed}:{fact.id}")
        new_object = None
        if config.mode == "update":
            candidates = [f.object for f in by_relation[fact.relation] if f.object != fact.object]
            if not candidates:
                raise SkipFact("no other object in the relation", f"fact {fact.id}: relation {fact.relation}")
            new_object = rng.choice(candidates)
        others = [f for f in dataset if f.id != fact.id]
        unrelated = [
            (f.queries[0], f.object) for f in rng.sample(others, min(config.unrelated_queries, len(others)))
        ]
        return cls(fact, config.mode, new_object, unrelated)

    def measure(self, lm: LoadedModel) -> Measurement:
        """Cloze scores of the fact's queries (the edited one first) for the old object and, for
        updates, the new one, and of the unrelated queries for their own answers."""
        queries = list(self.fact.queries)
        answers = [self.fact.object] + ([self.new_object] if self.new_object is not None else [])
        prompts = [q for _ in answers for q in queries] + [p for p, _ in self.unrelated]
        scores = score_cloze(
            lm, prompts, [a for a in answers for _ in queries] + [o for _, o in self.unrelated]
        )
        n = len(queries)
        new = scores[n : 2 * n] if self.new_object is not None else None
        return Measurement(scores[:n], new, scores[len(answers) * n :])


@dataclass
class Measurement:
    """Scores of one fact's queries (the edited query first) and of its unrelated queries."""

    old: list[ClozeScore]
    """For the fact's object o."""
    new: list[ClozeScore] | None
    """For the new object o' (updates)."""
    unrelated: list[ClozeScore]

    @property
    def target(self) -> list[ClozeScore]:
        """What the edit aims at: o' for an update (to predict), o for an erasure (to stop predicting)."""
        return self.new if self.new is not None else self.old


def by_relation(dataset: list[Fact]) -> dict[str, list[Fact]]:
    by_relation: dict[str, list[Fact]] = {}
    for fact in dataset:
        by_relation.setdefault(fact.relation, []).append(fact)
    return by_relation


def edit_evidence(mode: str, before: Measurement, after: Measurement) -> dict[str, Any]:
    """Rel/Gen/Loc/Avg and what shows the edit did what it should: the edited query's P(o) (and
    P(o') for updates) before and after, whether it moved the right way (P(o) fell for an erasure,
    P(o') rose for an update), and how many neighbour queries moved the right way. And which
    queries the model answered right (o at top-1) before the edit, with Gen over those neighbours
    alone: an erasure "succeeds" on a query the model never answered right whatever it does."""
    target_before, target_after = before.target, after.target
    direction = 1 if mode == "update" else -1
    moved = [direction * (a.prob - b.prob) > 0 for b, a in zip(target_before, target_after)]
    known = [score.rank == 0 for score in before.old]
    known_neighbours = [a.accuracy for a, k in zip(target_after[1:], known[1:]) if k]
    return {
        **edit_metrics(
            mode,
            target_after[0].accuracy,
            [s.accuracy for s in target_after[1:]],
            [s.argmax_tokens for s in before.unrelated],
            [s.argmax_tokens for s in after.unrelated],
        ),
        "prob_before": before.old[0].prob,
        "prob_after": after.old[0].prob,
        "new_prob_before": before.new[0].prob if before.new is not None else float("nan"),
        "new_prob_after": after.new[0].prob if after.new is not None else float("nan"),
        "moved_right": float(moved[0]),
        "neighbours": len(moved) - 1,
        "neighbours_moved": int(sum(moved[1:])),
        "query_known": known[0],
        "neighbours_known": len(known_neighbours),
        "gen_known": (
            edit_success(mode, float(np.mean(known_neighbours))) if known_neighbours else float("nan")
        ),
    }


def kn_signs(activations: torch.Tensor, set_name: str, neurons: list[tuple[int, int]]) -> list[int]:
    """Self (and its random control): signs at the edited query's target position; Union and CAS:
    of the mean activation over the fact's queries (``activations``: [queries, L, d_ff], the edited
    query first)."""
    one_query = set_name in ("self", CONTROL_SET)
    return activation_signs(activations[:1] if one_query else activations, neurons)


def edit_set(
    original: FactKNSets,
    filtered: FactKNSets,
    set_name: str,
    shape: tuple[int, int],
    seed: str,
    excluded: frozenset[Neuron] = frozenset(),
) -> list[Neuron]:
    """The neurons an edit of one fact goes through: its ``set_name`` KN set after the filters, or
    for the random control as many neurons as that Self set, drawn (seeded by ``seed``) outside
    every KN of the fact's unfiltered query and CAS sets and outside ``excluded`` (the activity
    filter's neurons, which no edit may touch)."""
    if set_name != CONTROL_SET:
        return filtered.kn_set(set_name)
    avoid = original.neurons | set(original.cas) | excluded
    return random_neurons(len(filtered.kn_set("self")), shape, avoid, random.Random(seed))


def activity_footprints(lm: LoadedModel, config: EditConfig, ppl_passages: Sequence[str]) -> torch.Tensor:
    """[L, d_ff] neuron footprints (:func:`~qloc.engine.editing.neuron_footprints`) on WikiText
    passages other than those of the perplexity check: what the activity filter cuts by, and the
    evidence every edit row keeps."""
    passages = wikitext_passages(ACTIVITY_PASSAGES, seed=f"activity:{config.seed}", exclude=ppl_passages)
    return neuron_footprints(lm, passages, config.ppl_tokens)


def activity_excluded(config: EditConfig, footprints: torch.Tensor) -> frozenset[Neuron]:
    """The neurons the activity filter keeps out of every edit (none when it is off)."""
    if config.activity_filter is None:
        return frozenset()
    return most_active(footprints, config.activity_filter)


def activity_report(config: EditConfig) -> str:
    """What the activity filter did, in words, for a study's output."""
    if config.activity_filter is None:
        return "activity filter off"
    return (
        f"activity filter {config.activity_filter:g}: the {config.activity_filter:.2%} of the model's "
        "neurons with the largest footprint on WikiText were in no edit (kn_dropped counts them with "
        "the shared filter's; every edit row keeps footprint_max and footprint_sum)"
    )


def filtered_kn_sets(
    knowledge: Mapping[str, FactKNSets], shared: SharedNeuronFilter, excluded: frozenset[Neuron]
) -> dict[str, FactKNSets]:
    """The KN sets an experiment edits: after the shared-neuron filter and without ``excluded``."""
    return {fact_id: known.without(excluded) for fact_id, known in shared.apply(knowledge).items()}


def dropped_by_filter(original: FactKNSets, filtered: FactKNSets, set_name: str) -> int:
    """KNs the shared-neuron filter removed from the fact's ``set_name`` set (0 for the control,
    drawn after it)."""
    if set_name not in KN_SETS:
        return 0
    return len(original.kn_set(set_name)) - len(filtered.kn_set(set_name))


def control_seed(config: EditConfig, fact: Fact) -> str:
    """The seed of a fact's random control set: one per fact, in single and sequential edits."""
    return f"{config.seed}:{CONTROL_SET}:{fact.id}"


def sequential_edit(
    lm: LoadedModel,
    config: EditConfig,
    knowledge: dict[str, FactKNSets],
    shared: SharedNeuronFilter,
    dataset: list[Fact],
    facts: list[Fact],
    set_name: str,
    count: int,
    repeat: int,
    passages: list[str],
) -> dict[str, Any]:
    """Table 7: ``count`` facts (sampled with seed ``repeat``) edited one after another through
    their ``set_name`` KN sets (after the shared-neuron filter) without restoring in between;
    every metric measured after the last edit and averaged over the edited facts. Each edit's
    signs are those of the activations of the model it edits (after the edits before it). The
    model is restored bit-exactly afterwards."""
    facts_by_relation = by_relation(dataset)
    excluded = activity_excluded(config, activity_footprints(lm, config, passages))
    filtered = filtered_kn_sets(knowledge, shared, excluded)
    chosen = random.Random(f"{config.seed}:sequential:{repeat}").sample(facts, min(count, len(facts)))
    cases = []
    for fact in chosen:
        try:
            cases.append(EditCase.draw(fact, config, facts_by_relation, dataset))
        except SkipFact:
            continue
    ppl_before = perplexity(lm, passages, config.ppl_tokens)
    before = [case.measure(lm) for case in cases]
    unedited = value_norms(lm)
    with contextlib.ExitStack() as edits:  # unwinding restores the edits in reverse order
        for case in cases:
            fact = case.fact
            shape = (lm.num_layers, lm.d_ff)
            neurons = edit_set(
                knowledge[fact.id], filtered[fact.id], set_name, shape, control_seed(config, fact), excluded
            )
            signs = None
            if config.edit_sign == "activation":
                signs = kn_signs(target_activations(lm, fact.queries, fact.object), set_name, neurons)
            edits.enter_context(
                edit_knowledge(
                    lm, neurons, fact.object, case.new_object, config.lambda1, config.lambda2, signs, unedited
                )
            )
        per_fact = [
            edit_evidence(config.mode, measured, case.measure(lm)) for case, measured in zip(cases, before)
        ]
        ppl_after = perplexity(lm, passages, config.ppl_tokens)
    keys = ("rel", "gen", "loc", "avg", "moved_right")
    means = {key: float(np.nanmean([m[key] for m in per_fact])) if per_fact else float("nan") for key in keys}
    sized_by = set_name if set_name in KN_SETS else "self"  # the control has the size of Self
    empty = sum(1 for case in cases if not filtered[case.fact.id].kn_set(sized_by))
    return {**means, "facts": len(cases), "empty_sets": empty, "dppl": (ppl_after - ppl_before) / ppl_before}


@dataclass(frozen=True)
class SequentialUnit:
    """One sequential-editing unit of work: a KN set and a sampling seed."""

    set_name: str
    repeat: int

    @property
    def id(self) -> str:
        return f"{self.set_name}/seed-{self.repeat}"

    @property
    def label(self) -> str:
        return f"sequential editing through {self.set_name} sets, seed {self.repeat}"


@dataclass
class SequentialRow(Row):
    """One sequential-editing run: its facts edited one after another, measured at the end."""

    table = "sequential"
    method: str
    mode: str
    kn_set: str
    seed: int
    requested: int
    rel: float
    gen: float
    loc: float
    avg: float
    moved_right: float
    facts: int
    empty_sets: int
    dppl: float


@dataclass(frozen=True)
class SequentialWorkBuilder:
    """The sequential edit sweep's :data:`~qloc.runs.executors.WorkBuilder` (Table 7): each model
    replica builds from it the work over :class:`SequentialUnit` s, ``count`` facts edited one after
    another per unit (a dataclass, so that Ray pickles it)."""

    config: EditConfig
    knowledge: dict[str, FactKNSets]
    shared: SharedNeuronFilter
    dataset: list[Fact]
    facts: list[Fact]
    count: int
    passages: list[str]

    def __call__(self, lm: LoadedModel) -> WorkFn:
        def work(unit: SequentialUnit, writer: UnitWriter) -> None:
            result = sequential_edit(
                lm,
                self.config,
                self.knowledge,
                self.shared,
                self.dataset,
                self.facts,
                unit.set_name,
                self.count,
                unit.repeat,
                self.passages,
            )
            row = SequentialRow(
                self.config.method, self.config.mode, unit.set_name, unit.repeat, self.count, **result
            )
            writer.add(row)

        return work


def sequential_table(sequential: pd.DataFrame) -> pd.DataFrame:
    """Table 7: mean, standard deviation and median over seeds per (method, mode, KN set), and the
    share of seeds whose edits broke the model (dPPL > 1)."""
    grouped = sequential.groupby(["method", "mode", "kn_set"], sort=False)
    metrics = [*METRICS, "moved_right"]
    table = grouped[metrics].agg(["mean", "std", "median"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["catastrophic"] = grouped["dppl"].agg(lambda d: float((d > CATASTROPHIC_DPPL).mean()))
    table["seeds"] = grouped.size()
    table["facts"] = grouped["facts"].mean()
    return table.reset_index()


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, prompt: str, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([lm.tokenizer(prompt).input_ids], device=lm.device)
    output = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(lm),
    )
    return lm.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def case_study(
    lm: LoadedModel,
    queries: list[str],
    answer: str,
    new: str | None,
    method: str = "ig",
    set_name: str = "self",
    steps: int = DEFAULT_STEPS,
    max_new_tokens: int = 8,
    edit_sign: str = "activation",
) -> pd.DataFrame:
    """Table 8: greedy continuations of a query (``queries[0]``) and its paraphrases before and
    after editing ``answer`` (to ``new``, or erasing it) through the query's KN set."""
    if edit_sign not in EDIT_SIGNS:
        raise ConfigError.invalid("edit_sign", edit_sign, f"choose {' or '.join(EDIT_SIGNS)}")
    scores = [attribute(lm, q, answer, method, steps=steps).scores for q in queries]
    query_sets = [kn_set(s) for s in scores]
    neurons = FactKNSets(query_sets, cas_set(scores)).kn_set(set_name)
    signs = (
        kn_signs(target_activations(lm, queries, answer), set_name, neurons)
        if edit_sign == "activation"
        else None
    )
    before = [greedy_continuation(lm, q, max_new_tokens) for q in queries]
    with edit_knowledge(lm, neurons, answer, new, signs=signs):
        after = [greedy_continuation(lm, q, max_new_tokens) for q in queries]
    return pd.DataFrame(
        {
            "role": ["query"] + ["neighbour"] * (len(queries) - 1),
            "prompt": queries,
            "before": before,
            "after": after,
            "answer": answer,
            "new": new,
            "kn_set": set_name,
            "kn_size": len(neurons),
            "method": method,
            "edit_sign": edit_sign,
        }
    )


def edit_success(mode: str, accuracy: float) -> float:
    """An edit's success from acc(x, target): of o' for an update (success = predicted), of o for an
    erasure (success = no longer predicted)."""
    return accuracy if mode == "update" else 1 - accuracy


def edit_metrics(
    mode: str,
    query_accuracy: float,
    neighbour_accuracies: list[float],
    unrelated_before: list[list[int]],
    unrelated_after: list[list[int]],
) -> dict[str, float]:
    """Rel, Gen, Loc and Avg of one edit (METHODS.md section 5). Accuracies are acc(x, target):
    of o' for an update (success = predicted), of o for an erasure (success = no longer predicted).
    Loc = share of unrelated queries whose argmax answer tokens did not change."""
    rel = edit_success(mode, query_accuracy)
    gen = edit_success(mode, float(np.mean(neighbour_accuracies))) if neighbour_accuracies else float("nan")
    loc = (
        float(np.mean([a == b for a, b in zip(unrelated_before, unrelated_after)]))
        if unrelated_before
        else float("nan")
    )
    return {"rel": rel, "gen": gen, "loc": loc, "avg": float(np.nanmean([rel, gen, loc]))}
