"""The knowledge-modification study (``qloc edit``; METHODS.md section 5, the paper's Tables 2 and 3).

Per fact of a localize run: edit through each KN set (Self = the first query's KN set, Union of
all queries' sets, CAS), measure Rel, Gen, Loc, Avg and the relative perplexity change, restore
the model bit-exactly, and store one row per (fact, set). KC/KI classes come from the run's KN
consistency under the static threshold, so Table 2/3 rows are split by class.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .attribution import attribute, kn_set
from .cas import cas_set
from .cloze import score_cloze
from .consistency import STATIC_THRESHOLD
from .editing import LAMBDA1, LAMBDA2, edit_knowledge, perplexity
from .errors import DataError, QlocError
from .knsets import FactKnowledge
from .models import LoadedModel
from .pararel import Fact
from .store import UnitWriter
from .sweep import SkipFact
from .tokens import answer_token_ids, pad_token_id

KN_SETS = ("self", "union", "cas")
METRICS = ["rel", "gen", "loc", "avg", "dppl"]


@dataclass(frozen=True)
class EditConfig:
    mode: str = "erase"
    sets: tuple[str, ...] = KN_SETS
    method: str = "ig"
    lambda1: float = LAMBDA1
    lambda2: float = LAMBDA2
    unrelated_queries: int = 10
    ppl_passages: int = 5
    ppl_tokens: int = 256
    static_threshold: float = STATIC_THRESHOLD
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("erase", "update"):
            raise QlocError(f"--mode {self.mode!r}: choose erase or update")
        unknown = [s for s in self.sets if s not in KN_SETS]
        if unknown or not self.sets:
            raise QlocError(f"--sets {','.join(self.sets)}: choose from {', '.join(KN_SETS)}")

    @property
    def stage(self) -> str:
        return f"edit-{self.mode}-{self.method}"

    def params(self) -> dict:
        return {**asdict(self), "sets": list(self.sets)}


@dataclass
class EditCase:
    """One fact's edit: the new object (updates) and the unrelated queries for Loc, drawn with a
    seed per fact so that single and sequential editing use the same ones."""

    fact: Fact
    mode: str
    new_object: str | None
    unrelated: list[tuple[str, str]]

    @classmethod
    def draw(cls, fact: Fact, config: "EditConfig", by_relation: dict[str, list[Fact]], dataset: list[Fact]) -> "EditCase":
        rng = random.Random(f"{config.seed}:{fact.id}")
        new_object = None
        if config.mode == "update":
            candidates = [f.object for f in by_relation[fact.relation] if f.object != fact.object]
            if not candidates:
                raise SkipFact("no other object in the relation", f"fact {fact.id}: relation {fact.relation}")
            new_object = rng.choice(candidates)
        others = [f for f in dataset if f.id != fact.id]
        unrelated = [(f.queries[0], f.object) for f in rng.sample(others, min(config.unrelated_queries, len(others)))]
        return cls(fact, config.mode, new_object, unrelated)

    def unrelated_scores(self, lm: LoadedModel):
        """Cloze scores of the unrelated queries for their own answers (Loc's reference)."""
        return score_cloze(lm, [p for p, _ in self.unrelated], [o for _, o in self.unrelated])

    def measure(self, lm: LoadedModel):
        """Cloze scores of the query and its neighbours for the edit's target (o' for updates, o
        for erasures), and of the unrelated queries for their own answers."""
        target = self.new_object if self.mode == "update" else self.fact.object
        queries = list(self.fact.queries)
        scores = score_cloze(lm, queries + [p for p, _ in self.unrelated], [target] * len(queries) + [o for _, o in self.unrelated])
        return scores[0], scores[1 : len(queries)], scores[len(queries) :]


def _by_relation(dataset: list[Fact]) -> dict[str, list[Fact]]:
    by_relation: dict[str, list[Fact]] = {}
    for fact in dataset:
        by_relation.setdefault(fact.relation, []).append(fact)
    return by_relation


def edit_work(lm: LoadedModel, config: EditConfig, knowledge: dict[str, FactKnowledge], dataset: list[Fact], passages: list[str]):
    """Per-fact work function for :func:`qloc.sweep.run_sweep`."""
    by_relation = _by_relation(dataset)
    ppl_before = perplexity(lm, passages, config.ppl_tokens)

    def work(fact: Fact, writer: UnitWriter) -> None:
        known = knowledge[fact.id]
        case = EditCase.draw(fact, config, by_relation, dataset)
        try:
            for answer in filter(None, (fact.object, case.new_object)):
                answer_token_ids(lm, answer)  # fail here, before any edit, if an answer has no tokens
            unrelated_before = case.unrelated_scores(lm)
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
        kind = known.knowledge_class(config.static_threshold)
        new_object = case.new_object
        for set_name in config.sets:
            neurons = known.kn_set(set_name)
            with edit_knowledge(lm, neurons, fact.object, new_object, config.lambda1, config.lambda2):
                rel_score, gen_scores, unrelated_after = case.measure(lm)
                ppl = perplexity(lm, passages, config.ppl_tokens)
            metrics = edit_metrics(config.mode, rel_score.accuracy, [s.accuracy for s in gen_scores],
                                   [s.argmax_tokens for s in unrelated_before], [s.argmax_tokens for s in unrelated_after])
            writer.add("edits", {
                "fact_id": fact.id, "relation": fact.relation, "method": config.method, "mode": config.mode,
                "kn_set": set_name, "class": kind, "cs": known.consistency, "kn_size": len(neurons),
                "object": fact.object, "new_object": new_object, **metrics,
                "ppl_before": ppl_before, "ppl_after": ppl, "dppl": (ppl - ppl_before) / ppl_before,
            })

    return work


def sequential_edit(
    lm: LoadedModel,
    config: EditConfig,
    knowledge: dict[str, FactKnowledge],
    dataset: list[Fact],
    facts: list[Fact],
    set_name: str,
    count: int,
    repeat: int,
    passages: list[str],
) -> dict[str, float]:
    """Table 7: ``count`` facts (sampled with seed ``repeat``) edited one after another through
    their ``set_name`` KN sets without restoring in between; every metric measured after the
    last edit and averaged over the edited facts. The model is restored bit-exactly afterwards."""
    by_relation = _by_relation(dataset)
    chosen = random.Random(f"{config.seed}:sequential:{repeat}").sample(facts, min(count, len(facts)))
    cases = []
    for fact in chosen:
        try:
            cases.append(EditCase.draw(fact, config, by_relation, dataset))
        except SkipFact:
            continue
    ppl_before = perplexity(lm, passages, config.ppl_tokens)
    before = [case.unrelated_scores(lm) for case in cases]
    with contextlib.ExitStack() as edits:  # unwinding restores the edits in reverse order
        for case in cases:
            edits.enter_context(edit_knowledge(lm, knowledge[case.fact.id].kn_set(set_name), case.fact.object,
                                               case.new_object, config.lambda1, config.lambda2))
        per_fact = []
        for case, unrelated_before in zip(cases, before):
            rel_score, gen_scores, unrelated_after = case.measure(lm)
            per_fact.append(edit_metrics(config.mode, rel_score.accuracy, [s.accuracy for s in gen_scores],
                                         [s.argmax_tokens for s in unrelated_before],
                                         [s.argmax_tokens for s in unrelated_after]))
        ppl_after = perplexity(lm, passages, config.ppl_tokens)
    means = {key: float(np.nanmean([m[key] for m in per_fact])) for key in ("rel", "gen", "loc", "avg")}
    return {**means, "facts": len(cases), "dppl": (ppl_after - ppl_before) / ppl_before}


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


def sequential_work(lm, config, knowledge, dataset, facts, count: int, passages):
    """Work function for :func:`qloc.sweep.run_sweep` over :class:`SequentialUnit` s."""

    def work(unit: SequentialUnit, writer: UnitWriter) -> None:
        result = sequential_edit(lm, config, knowledge, dataset, facts, unit.set_name, count, unit.repeat, passages)
        writer.add("sequential", {"method": config.method, "mode": config.mode, "kn_set": unit.set_name,
                                  "seed": unit.repeat, "requested": count, **result})

    return work


def sequential_table(sequential: pd.DataFrame) -> pd.DataFrame:
    """Table 7: mean and standard deviation over seeds per (method, mode, KN set)."""
    grouped = sequential.groupby(["method", "mode", "kn_set"], sort=False)
    table = grouped[METRICS].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["seeds"] = grouped.size()
    table["facts"] = grouped["facts"].mean()
    return table.reset_index()


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, prompt: str, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([lm.tokenizer(prompt).input_ids], device=lm.device)
    output = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad_token_id(lm))
    return lm.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def case_study(
    lm: LoadedModel,
    queries: list[str],
    answer: str,
    new: str | None,
    method: str = "ig",
    set_name: str = "self",
    steps: int = 20,
    max_new_tokens: int = 8,
) -> pd.DataFrame:
    """Table 8: greedy continuations of a query (``queries[0]``) and its paraphrases before and
    after editing ``answer`` (to ``new``, or erasing it) through the query's KN set."""
    scores = [attribute(lm, q, answer, method, steps=steps).scores for q in queries]
    query_sets = [kn_set(s) for s in scores]
    neurons = FactKnowledge(query_sets, cas_set(scores)).kn_set(set_name)
    before = [greedy_continuation(lm, q, max_new_tokens) for q in queries]
    with edit_knowledge(lm, neurons, answer, new):
        after = [greedy_continuation(lm, q, max_new_tokens) for q in queries]
    return pd.DataFrame({
        "role": ["query"] + ["neighbour"] * (len(queries) - 1), "prompt": queries, "before": before, "after": after,
        "answer": answer, "new": new, "kn_set": set_name, "kn_size": len(neurons), "method": method,
    })


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
    success = (lambda acc: acc) if mode == "update" else (lambda acc: 1 - acc)
    rel = success(query_accuracy)
    gen = success(float(np.mean(neighbour_accuracies))) if neighbour_accuracies else float("nan")
    loc = float(np.mean([a == b for a, b in zip(unrelated_before, unrelated_after)])) if unrelated_before else float("nan")
    return {"rel": rel, "gen": gen, "loc": loc, "avg": float(np.nanmean([rel, gen, loc]))}


def edit_table(edits: pd.DataFrame, sets: tuple[str, ...]) -> pd.DataFrame:
    """Mean Rel, Gen, Loc, Avg, dPPL per (method, mode, KN set, class), the median dPPL, and fact counts."""
    frame = edits[edits["kn_set"].isin(sets)]
    grouped = frame.groupby(["method", "mode", "kn_set", "class"], sort=False)
    table = grouped[METRICS].mean()
    # One broken edit can raise perplexity by orders of magnitude and swamp the mean.
    table["dppl_median"] = grouped["dppl"].median()
    table["facts"] = grouped.size()
    order = {name: i for i, name in enumerate(KN_SETS)}
    table = table.reset_index()
    table["order"] = table["kn_set"].map(order)
    return table.sort_values(["method", "mode", "class", "order"]).drop(columns="order").reset_index(drop=True)
