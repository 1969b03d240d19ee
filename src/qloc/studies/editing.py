"""The knowledge-modification study (``qloc edit``; METHODS.md section 5, the paper's Tables 2 and 3).

Per fact of a localize run: edit through each KN set (Self = the first query's KN set, Union of
all queries' sets, CAS), measure Rel, Gen, Loc, Avg and the relative perplexity change, restore
the model bit-exactly, and store one row per (fact, set). KC/KI classes come from the run's KN
consistency under the static threshold, so Table 2/3 rows are split by class.

Before editing, the shared-neuron filter drops KNs that a large share of the relation's facts
hold (:func:`qloc.studies.knsets.shared_neurons`), and each KN's change follows the sign of its activation
(:mod:`qloc.engine.editing`). Every row records the evidence: the answer's probability on the edited
query before and after, how many neighbours moved, and how many KNs the filter removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..data.pararel import Fact, causal_prompt, load_pararel
from ..data.wikitext import wikitext_passages
from ..engine.editing import edit_knowledge, perplexity, target_activations
from ..engine.models import DEFAULT_DEVICE, DEFAULT_MODEL, LoadedModel
from ..engine.tokens import answer_token_ids
from ..errors import ConfigError, DataError
from ..runs.executors import Execution, ModelSpec, execute
from ..runs.outputs import write_table
from ..runs.rows import Row, UnitWriter
from ..runs.store import STORE_FILE, RunStore
from ..runs.sweep import SkipFact, WorkFn
from ..settings import setting
from . import editing_claims
from .edit_measures import (
    CATASTROPHIC_DPPL,
    CONTROL_SET,
    EDIT_SETS,
    KN_SETS,
    METRICS,
    EditCase,
    EditConfig,
    Measurement,
    SequentialRow,
    SequentialUnit,
    SequentialWorkBuilder,
    activity_excluded,
    activity_footprints,
    activity_report,
    by_relation,
    case_study,
    control_seed,
    dropped_by_filter,
    edit_evidence,
    edit_set,
    filtered_kn_sets,
    kn_signs,
    sequential_table,
)
from .knsets import FactKNSets, Neuron, SharedNeuronFilter
from .localize_run import (
    FACT_LIMIT_HELP,
    LOCALIZED_RUN_HELP,
    STRATIFY_HELP,
    STRATIFY_METHOD_HELP,
    LocalizedRun,
    check_stratification,
    read_localized_run,
)
from .registry import Outcome, Panel, Reproduction, Study
from .stored_knsets import LOCALIZE_STAGE

NOT_MEASURED = float("nan")


@dataclass
class EditRow(Row):
    """One fact edited through one KN set: the set, what the edit did (NaN where the set was empty
    and nothing was edited) and the evidence that it did what it should."""

    table = "edits"
    fact_id: str
    relation: str
    method: str
    mode: str
    kn_set: str
    class_: str
    cs: float
    kn_size: int
    kn_dropped: int
    """KNs the shared-neuron filter removed from the set."""
    kn_negative: int
    """KNs with a negative activation (edited with the opposite sign by default)."""
    object: str
    new_object: str | None
    query: str
    ppl_before: float
    rel: float = NOT_MEASURED
    gen: float = NOT_MEASURED
    loc: float = NOT_MEASURED
    avg: float = NOT_MEASURED
    prob_before: float = NOT_MEASURED
    prob_after: float = NOT_MEASURED
    new_prob_before: float = NOT_MEASURED
    new_prob_after: float = NOT_MEASURED
    moved_right: float = NOT_MEASURED
    neighbours: int = 0
    neighbours_moved: int = 0
    ppl_after: float = NOT_MEASURED
    dppl: float = NOT_MEASURED
    query_known: bool | None = None
    """Whether the model answered the edited query right (o at top-1) before the edit."""
    neighbours_known: int | None = None
    """Neighbour queries the model answered right before the edit."""
    gen_known: float = NOT_MEASURED
    """Gen over those neighbours alone."""
    footprint_max: float = NOT_MEASURED
    """The largest footprint (||v|| x mean |activation| on WikiText) among the edited neurons."""
    footprint_sum: float = NOT_MEASURED
    """Their footprints summed: how much the edit reaches every token."""


@dataclass(frozen=True)
class EditWorkBuilder:
    """The fact-by-fact edit sweep's :data:`~qloc.runs.executors.WorkBuilder` (Tables 2 and 3):
    what every edit of the sweep takes; each model replica builds its :class:`EditWork` from it (a
    dataclass, so that Ray pickles it and its parameters can be read)."""

    config: EditConfig
    knowledge: dict[str, FactKNSets]
    shared: SharedNeuronFilter
    dataset: list[Fact]
    passages: list[str]
    classes: dict[str, str] | None = None
    """A stratified sample's classes (:attr:`qloc.studies.localize_run.FactSample.classes`); None:
    each fact's static class."""

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return EditWork(lm, self)


@dataclass
class EditWork:
    """Per-fact work function for :func:`qloc.runs.sweep.run_sweep` on one model replica: the fact
    edited through each KN set in turn, from the unedited model each time."""

    lm: LoadedModel
    plan: EditWorkBuilder
    facts_by_relation: dict[str, list[Fact]] = field(init=False)
    footprints: torch.Tensor = field(init=False)
    """[L, d_ff] neuron footprints on WikiText (the activity filter's measure)."""
    excluded: frozenset[Neuron] = field(init=False)
    """The activity filter's neurons, which no edit touches."""
    filtered: dict[str, FactKNSets] = field(init=False)
    """The KN sets after the shared-neuron and activity filters."""
    ppl_before: float = field(init=False)

    def __post_init__(self) -> None:
        # Once per model replica: none of these depends on the fact.
        self.facts_by_relation = by_relation(self.plan.dataset)
        self.footprints = activity_footprints(self.lm, self.plan.config, self.plan.passages)
        self.excluded = activity_excluded(self.plan.config, self.footprints)
        self.filtered = filtered_kn_sets(self.plan.knowledge, self.plan.shared, self.excluded)
        self.ppl_before = perplexity(self.lm, self.plan.passages, self.plan.config.ppl_tokens)

    def __call__(self, fact: Fact, writer: UnitWriter) -> None:
        original, known = self.plan.knowledge[fact.id], self.filtered[fact.id]
        case = EditCase.draw(fact, self.plan.config, self.facts_by_relation, self.plan.dataset)
        before = self._measure_unedited(fact, case)
        activations = target_activations(self.lm, fact.queries, fact.object)
        fact_class = (
            self.plan.classes[fact.id]
            if self.plan.classes
            else original.knowledge_class(self.plan.config.static_threshold)
        )
        shape = (self.lm.num_layers, self.lm.d_ff)
        for set_name in self.plan.config.sets:
            neurons = edit_set(
                original, known, set_name, shape, control_seed(self.plan.config, fact), self.excluded
            )
            signs = kn_signs(activations, set_name, neurons)  # recorded with the literal equation too
            footprints = [float(self.footprints[layer, index]) for layer, index in neurons]
            row = EditRow(
                fact_id=fact.id,
                relation=fact.relation,
                method=self.plan.config.method,
                mode=self.plan.config.mode,
                kn_set=set_name,
                class_=fact_class,
                cs=original.consistency,
                kn_size=len(neurons),
                kn_dropped=dropped_by_filter(original, known, set_name),
                kn_negative=sum(1 for sign in signs if sign < 0),
                object=fact.object,
                new_object=case.new_object,
                query=fact.queries[0],
                ppl_before=self.ppl_before,
                neighbours=len(fact.queries) - 1,
                footprint_max=max(footprints, default=NOT_MEASURED),
                footprint_sum=sum(footprints) if footprints else NOT_MEASURED,
            )
            if not neurons:  # nothing to edit through: no measurement, counted as an empty set
                writer.add(row)
                continue
            writer.add(self._edited(row, fact, case, before, neurons, signs))

    def _measure_unedited(self, fact: Fact, case: EditCase) -> Measurement:
        try:
            for answer in filter(None, (fact.object, case.new_object)):
                answer_token_ids(self.lm, answer)  # fail here, before any edit, if an answer has no tokens
            return case.measure(self.lm)
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None

    def _edited(
        self,
        row: EditRow,
        fact: Fact,
        case: EditCase,
        before: Measurement,
        neurons: list[Neuron],
        signs: list[int],
    ) -> EditRow:
        """``row`` with what editing through ``neurons`` did; the model is restored on return."""
        config = self.plan.config
        with edit_knowledge(
            self.lm,
            neurons,
            fact.object,
            case.new_object,
            config.lambda1,
            config.lambda2,
            signs if config.edit_sign == "activation" else None,
        ):
            after = case.measure(self.lm)
            ppl = perplexity(self.lm, self.plan.passages, config.ppl_tokens)
        evidence = edit_evidence(config.mode, before, after)
        return replace(row, **evidence, ppl_after=ppl, dppl=(ppl - self.ppl_before) / self.ppl_before)


def edit_table(edits: pd.DataFrame, sets: tuple[str, ...]) -> pd.DataFrame:
    """Tables 2 and 3 per (method, mode, KN set, class): mean Rel, Gen, Loc, Avg and dPPL over the
    edits that had a KN to edit, beside what keeps a mean honest: the median dPPL, the share of
    catastrophic edits (dPPL > 1), the share that moved the edited query's answer the right way,
    median probabilities before and after, the mean KN-set size, KNs removed by the shared filter
    (mean and total), how many sets were empty (not edited) and how many of those the filter emptied.

    Erasure's Rel and Gen are 1 - accuracy, 1 on a query the model never answered right, whatever
    the edit does. So beside them: Rel over the edited queries the model answered right (o at top-1)
    before the edit (``rel_known``, over ``known_queries`` of them), Gen over such neighbours
    (``gen_known``, over ``known_neighbours``), and the mean drop of the edited query's P(o), which
    every query can fail (``prob_drop``); ``gen_moved`` is Gen's counterpart that every paraphrase
    can fail: the share of the neighbour queries whose P(o) (update: P(o')) moved the intended way.
    Rows stored before the known columns were recorded leave
    them NaN: not stored."""
    frame = _edit_measures(edits[edits["kn_set"].isin(sets)].copy())
    grouped = frame.groupby(["method", "mode", "kn_set", "class"], sort=False)
    table = grouped[METRICS].mean()
    table["dppl_median"] = grouped["dppl"].median()
    table["catastrophic"] = grouped["catastrophic"].mean()
    table["moved_right"] = grouped["moved_right"].mean()
    table["gen_moved"] = grouped["gen_moved"].mean()
    for column in ("prob_before", "prob_after", "new_prob_before", "new_prob_after"):
        table[f"{column}_median"] = grouped[column].median()
    table["kn_size"] = grouped["kn_size"].mean()
    table["kn_dropped"] = grouped["kn_dropped"].mean()
    table["empty_sets"] = grouped["kn_size"].agg(lambda sizes: int((sizes == 0).sum()))
    table["kn_dropped_total"] = grouped["kn_dropped"].sum()
    table["emptied_by_filter"] = grouped["emptied_by_filter"].sum()
    table["facts"] = grouped.size()
    table["rel_known"] = grouped["rel_of_known"].mean()
    table["known_queries"] = grouped["known_edit"].sum(min_count=1)
    table["gen_known"] = grouped["gen_known"].mean()
    table["known_neighbours"] = grouped["known_neighbours"].sum(min_count=1)
    table["prob_drop"] = grouped["prob_drop"].mean()
    order = {name: i for i, name in enumerate(EDIT_SETS)}
    table = table.reset_index()
    table["order"] = table["kn_set"].map(order)
    return (
        table.sort_values(["method", "mode", "class", "order"]).drop(columns="order").reset_index(drop=True)
    )


def _edit_measures(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (edit rows) with its measures numeric and what :func:`edit_table` averages per
    edit beside them: whether it was catastrophic, the edited query's known state and Rel where it
    was known, the known neighbours, the drop of P(o), Gen's moved share and sets the filter emptied."""
    numeric = METRICS + [
        "moved_right",
        "prob_before",
        "prob_after",
        "new_prob_before",
        "new_prob_after",
        "kn_dropped",
        "neighbours",
        "neighbours_moved",
        "query_known",
        "neighbours_known",
        "gen_known",
    ]
    for column in numeric:
        # NaN is stored as NULL (a column of only NULLs reads back as objects); a frame not read
        # through EditRow (which adds them) may lack columns newer than its rows.
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else float("nan")
    frame["catastrophic"] = (frame["dppl"] > CATASTROPHIC_DPPL).astype(float).where(frame["dppl"].notna())
    edited = frame["kn_size"] > 0
    frame["known_edit"] = frame["query_known"].where(edited)
    frame["rel_of_known"] = frame["rel"].where(frame["known_edit"] == 1)
    frame["known_neighbours"] = frame["neighbours_known"].where(edited)
    frame["prob_drop"] = frame["prob_before"] - frame["prob_after"]
    frame["gen_moved"] = (frame["neighbours_moved"] / frame["neighbours"]).where(
        edited & (frame["neighbours"] > 0)
    )
    frame["emptied_by_filter"] = (frame["kn_size"] == 0) & (frame["kn_dropped"] > 0)
    return frame


@dataclass(frozen=True)
class EditRequest:
    run_dir: Path | None = setting(None, LOCALIZED_RUN_HELP)
    mode: str | None = setting(
        None, "erase or update (METHODS.md section 5); default erase, or update with --new."
    )
    config: EditConfig = setting(factory=EditConfig)
    method: str | None = setting(None)
    limit: int | None = setting(None, FACT_LIMIT_HELP)
    stratify: str | None = setting(None, STRATIFY_HELP)
    stratify_method: str | None = setting(None, STRATIFY_METHOD_HELP)
    sequential: int = setting(0, "Edit N sampled facts one after another (Table 7); 0: one at a time.")
    seeds: int = setting(5, "Sequential editing: repeats with different samples.")
    case: str | None = setting(
        None, "Case study (Table 8): edit the fact this query asks, print greedy continuations."
    )
    new: str | None = setting(None, "Case study: the new object (omit to erase).")
    answer: str | None = setting(
        None, "Case study: the current object (default: ParaRel's, if the query is in it)."
    )
    model: str = setting(DEFAULT_MODEL)
    device: str = setting(DEFAULT_DEVICE)
    execution: Execution = setting(factory=Execution)

    def __post_init__(self) -> None:
        check_stratification(self.stratify, self.stratify_method)
        if self.sequential > 0 and self.stratify is not None:
            raise ConfigError(
                lambda name: (
                    f"{name('sequential')} samples from all of the run's facts; it does not combine with "
                    f"{name('stratify')}"
                )
            )


def run(request: EditRequest) -> Outcome:
    mode = request.mode or ("update" if request.new is not None else "erase")
    if request.case is not None:
        return run_case(request, replace(request.config, mode=mode))
    run_dir = _checked_run_dir(request)
    localized = read_localized_run(run_dir, request.method, request.device)
    config = replace(request.config, mode=mode, method=localized.method)
    shared = localized.shared_filter(config.shared_filter, config.shared_reference, config.shared_min_facts)
    passages = wikitext_passages(config.ppl_passages, seed=config.seed)
    if request.sequential > len(localized.facts):
        raise ConfigError.invalid(
            "sequential",
            request.sequential,
            f"run {str(run_dir)!r} has only {len(localized.facts)} facts",
        )
    if request.sequential > 0:
        return _run_sequential(request, localized, config, shared, passages)
    return _run_fact_by_fact(request, localized, config, shared, passages)


def _checked_run_dir(request: EditRequest) -> Path:
    """The localize run to edit; settings that only a case study takes are refused."""
    if request.run_dir is None:
        raise ConfigError(
            lambda name: f"{name('run_dir')} (a localize run) is needed, except for a {name('case')} study"
        )
    if request.answer is not None or request.new is not None:
        raise ConfigError(
            lambda name: (
                f"{name('answer')} and {name('new')} are for {name('case')} studies; a run's updates "
                "draw o' from the relation"
            )
        )
    return request.run_dir


def _run_sequential(
    request: EditRequest,
    localized: LocalizedRun,
    config: EditConfig,
    shared: SharedNeuronFilter,
    passages: list[str],
) -> Outcome:
    """Table 7: ``request.sequential`` facts edited one after another, per KN set and seed."""
    # Seed-major, so that an interrupted run has every KN set for the seeds it finished.
    units = [SequentialUnit(name, repeat) for repeat in range(request.seeds) for name in config.sets]
    build = SequentialWorkBuilder(
        config, localized.knowledge, shared, localized.dataset, localized.facts, request.sequential, passages
    )
    sequence = {**config.params(), "sequential": request.sequential, "seeds": request.seeds}
    stage = f"sequential-{config.mode}-{config.method}"
    plan = localized.sweep(stage, sequence, build, f"sequential {config.mode}", units)
    execute(plan, request.execution)
    with RunStore.open_existing(localized.run_dir) as store:
        table = sequential_table(store.frame(SequentialRow))
    write_table(table, localized.run_dir / "tables", "table7")
    return Outcome([table, activity_report(config)])


def _run_fact_by_fact(
    request: EditRequest,
    localized: LocalizedRun,
    config: EditConfig,
    shared: SharedNeuronFilter,
    passages: list[str],
) -> Outcome:
    """Tables 2 and 3: each sampled fact edited alone, through each KN set."""
    tables = localized.run_dir / "tables"
    sample = localized.sample(request.limit, config.seed, request.stratify, request.stratify_method)
    build = EditWorkBuilder(config, localized.knowledge, shared, localized.dataset, passages, sample.classes)
    description = f"{config.mode} via {','.join(config.sets)}"
    plan = localized.sweep(
        config.stage, {**config.params(), **sample.params}, build, description, sample.facts
    )
    summary = execute(plan, request.execution)
    with RunStore.open_existing(localized.run_dir) as store:
        edits = store.frame(EditRow)
    for name, chosen in (("table2", ("self", "union")), ("table3", ("self", "union", "cas", CONTROL_SET))):
        write_table(edit_table(edits, chosen), tables, name)
    filtered = shared.report(localized.knowledge, [s for s in config.sets if s in KN_SETS])
    return Outcome(
        [
            edit_table(edits, config.sets),
            filtered,
            activity_report(config),
            f"facts: {summary.describe()}{sample.note}; tables in {tables}",
        ]
    )


def run_case(request: EditRequest, config: EditConfig) -> Outcome:
    """Table 8: one query's fact edited through the query's KN set, greedy continuations before and after."""
    if (config.mode == "update") != (request.new is not None):
        raise ConfigError(
            lambda name: (
                f"a {name('case')} update needs {name('new')} (the object to write); an erasure takes none"
            )
        )
    if request.sequential:
        raise ConfigError(
            lambda name: f"{name('case')} edits one fact; it does not combine with {name('sequential')}"
        )
    assert request.case is not None
    model = ModelSpec(request.model, request.device)
    if request.run_dir is not None and (request.run_dir / STORE_FILE).exists():
        with RunStore.open_existing(request.run_dir) as store:  # the case is about the run's model
            localized = store.params(LOCALIZE_STAGE)
        model = ModelSpec(localized["model"], request.device, localized["dtype"])
    prompt = causal_prompt(request.case) or request.case.strip()
    fact = next((f for f in load_pararel().facts if prompt in f.queries), None)
    if request.answer is None and fact is None:
        raise ConfigError(
            lambda name: (
                f"{name('case')} {request.case!r} is not a ParaRel query: give its current object with "
                f"{name('answer')}"
            )
        )
    answer = request.answer or fact.object  # type: ignore[union-attr]
    queries = [prompt] + ([q for q in fact.queries if q != prompt] if fact else [])
    set_name, method = config.sets[0], request.method or "ig"
    table = case_study(
        model.load(), queries, answer, request.new, method, set_name, edit_sign=config.edit_sign
    )
    if request.run_dir is not None:
        write_table(table, request.run_dir / "tables", "table8")
    title = f"{answer!r} -> {request.new!r} via {set_name} ({method}, {table.kn_size[0]} KNs)"
    return Outcome([title, table[["role", "prompt", "before", "after"]]])


SEQUENTIAL = {"sample": (4, 2), "full": (100, 5)}
"""(facts edited in a row, seeds) of sequential editing in ``qloc reproduce``, per scale (full: the
paper's setting, 100 facts and 5 runs)."""


def reproduce(plan: Reproduction) -> list[tuple[str, Any]]:
    config = EditConfig(seed=plan.seed)
    sequential, seeds = SEQUENTIAL[plan.scale]
    if plan.facts is not None:  # --facts overrides the scale's run size: edit at most all its facts
        sequential = min(sequential, plan.facts)
    request = EditRequest(
        plan.directory, config=config, method=plan.method, device=plan.device, execution=plan.execution
    )
    return [
        ("erasure", replace(request, mode="erase")),
        ("update", replace(request, mode="update")),
        ("sequential update", replace(request, mode="update", sequential=sequential, seeds=seeds)),
    ]


STUDY = Study(
    name="edit",
    summary="Knowledge erasure or update through KN sets: Rel, Gen, Loc, Avg and perplexity change per "
    "fact (resumable), then Table 2 (Self, Union) and Table 3 (with CAS) for KC and KI facts. With "
    "--sequential N: N facts edited without restoring in between, --seeds times (Table 7).",
    request=EditRequest,
    run=run,
    panels=(
        Panel(50, "Table 2: knowledge modification through Self and Union KN sets", ("table2",)),
        Panel(60, "Table 3: knowledge modification with Consistency-Aware KN selection", ("table3",)),
        Panel(110, "Table 7: sequential editing", ("table7",)),
        Panel(120, "Table 8: case study", ("table8",)),
    ),
    captions=editing_claims.CAPTIONS,
    claims=editing_claims.EditingClaims,
    examples=(
        "qloc edit --run-dir runs/smollm2 --mode erase            "
        "# Tables 2 and 3: Self, Union, CAS; KC vs KI",
        "qloc edit --run-dir runs/smollm2 --mode erase --limit 40 "
        "# the same on a seeded 40 of the run's facts (extendable)",
        "qloc edit --run-dir runs/smollm2 --mode update --sequential 100 --seeds 5   # Table 7",
        'qloc edit --case "The capital of France is" --answer Paris --new Rome       '
        "# Table 8 style case study",
    ),
    reproduce=reproduce,
)
