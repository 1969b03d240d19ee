"""The localization sweep (``qloc localize``): KN sets of every usable query of every fact.

Unit of work = one fact. For each method, each usable query is attributed, its KN set (METHODS.md
section 3) and top scores are stored, and the fact's Consistency-Aware KN set (section 8) is
computed from the same per-query scores, so editing needs no second attribution pass. Dense
scores are kept only with ``save_scores`` (fp16, compressed): a full ParaRel sweep of an 8B model
has about 2 million (query, method) pairs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..data.pararel import Fact, interleave_relations
from ..data.selection import Selection
from ..engine.attribution import (
    METHODS,
    Attribution,
    AttributionSettings,
    FirstOrder,
    attribute,
    attribute_many,
)
from ..engine.cloze import ClozeScore, score_cloze
from ..engine.models import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, LoadedModel
from ..engine.tokens import encode_query
from ..errors import ConfigError, DataError
from ..runs.executors import Execution, ModelSpec, SweepPlan, execute
from ..runs.rows import Row, UnitWriter
from ..runs.store import RunStore
from ..runs.sweep import SkipFact, WorkFn
from ..settings import flat_params, setting
from .known import CENSUS_DIR_HELP, KNOWN_POOL_HELP, known_facts
from .knrows import CasSetRow, DenseScoresRow, KnSetRow
from .knsets import CAS_THRESHOLD, cas_set
from .registry import Outcome, Reproduction, Study
from .stored_knsets import LOCALIZE_STAGE, compress_scores

STAGE = LOCALIZE_STAGE
T = TypeVar("T")


@dataclass(frozen=True)
class LocalizeConfig:
    """The localize stage's parameters."""

    methods: tuple[str, ...] = setting(
        ("ig", "amig", "sig"),
        "Comma-separated attribution methods: ig, amig, sig, and the first-order gxa, gxa-amig.",
    )
    attribution: AttributionSettings = setting(factory=AttributionSettings)
    """Steps, rule, answer tokens and the KN-set cut (``--steps``, ..., ``--top-k``), checked there."""
    cas_beta1: float = setting(1.0, hidden=True)
    cas_beta2: float = setting(1.0, hidden=True)
    cas_threshold: float = setting(CAS_THRESHOLD, hidden=True)
    top_scores: int = setting(
        20, "How many of each query's best (layer, neuron, score) are stored.", hidden=True
    )
    save_scores: bool = setting(False, "Also store dense scores (fp16, compressed).")

    def __post_init__(self) -> None:
        """Reject bad settings before they are stored as the run's parameters."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError.invalid("methods", ",".join(self.methods), f"choose from {', '.join(METHODS)}")

    def params(self) -> dict:
        """The stage's parameters as a run stores them: the attribution settings flat among the
        others (``steps``, ``threshold``, ...), as runs made before they were grouped stored them."""
        return {**flat_params(self), "methods": list(self.methods)}


@dataclass
class SkippedFactRow(Row):
    """A fact of a :class:`FactChunk` that could not be localized (a one-fact unit is skipped as a
    whole instead, in the store's units table)."""

    table = "skipped_facts"
    fact_id: str
    relation: str
    kind: str
    reason: str


@dataclass(frozen=True)
class FactChunk:
    """A unit of a first-order localize sweep: consecutive facts of the sweep's order whose queries
    are attributed together, so that queries of one length from different facts share each
    forward and backward (where a first-order method's speed is; a fact has about 6 queries)."""

    facts: tuple[Fact, ...]

    @property
    def id(self) -> str:
        return f"{self.facts[0].id}..{self.facts[-1].id}"

    @property
    def label(self) -> str:
        return f"facts {self.id} ({len(self.facts)} facts)"

    @property
    def size(self) -> int:
        """Facts: the progress bar counts these, as it does in a sweep of one fact per unit."""
        return len(self.facts)


def check_facts_per_unit(facts_per_unit: int, methods: Sequence[str]) -> None:
    """Refuse units of several facts for a path method (nothing to batch) or of under one fact."""
    if facts_per_unit < 1:
        raise ConfigError.invalid("facts_per_unit", facts_per_unit, "at least 1")
    if path := [m for m in methods if not issubclass(METHODS[m], FirstOrder)]:
        raise ConfigError(
            lambda name: (
                f"{name('facts_per_unit')} {facts_per_unit} batches first-order methods only (gxa, "
                f"gxa-amig); {', '.join(path)} attribute query by query: give them a run of their own"
            )
        )


def fact_chunks(facts: Sequence[Fact], facts_per_unit: int) -> list[FactChunk]:
    """``facts`` in their order, ``facts_per_unit`` at a time (the last chunk may be shorter)."""
    return [FactChunk(tuple(facts[i : i + facts_per_unit])) for i in range(0, len(facts), facts_per_unit)]


def localize_work(lm: LoadedModel, config: LocalizeConfig, max_batch_rows: int | None = None) -> WorkFn:
    """The work function for :func:`qloc.runs.sweep.run_sweep` over facts or :class:`FactChunk` s."""

    def work(unit: Fact | FactChunk, writer: UnitWriter) -> None:
        facts = unit.facts if isinstance(unit, FactChunk) else (unit,)
        usable = []
        for fact in facts:
            try:
                for prompt in fact.queries:  # what scoring needs: a prompt and answer that tokenize
                    encode_query(lm, prompt, fact.object)
            except DataError as exc:
                if isinstance(unit, Fact):
                    raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
                writer.add(SkippedFactRow(fact.id, fact.relation, "answer not tokenizable", str(exc)))
                continue
            usable.append(fact)
        prompts = [q for fact in usable for q in fact.queries]
        answers = [fact.object for fact in usable for _ in fact.queries]
        cloze = per_fact(usable, score_cloze(lm, prompts, answers) if prompts else [])
        for method in config.methods:
            attributed = per_fact(
                usable, timed_attributions(lm, prompts, answers, method, config, max_batch_rows)
            )
            for fact, knows, results in zip(usable, cloze, attributed):
                write_fact(writer, fact, method, config, knows, results)

    return work


@dataclass(frozen=True)
class LocalizeWorkBuilder:
    """The localize sweep's :data:`~qloc.runs.executors.WorkBuilder`: each model replica builds
    :func:`localize_work` from it (a dataclass, not a closure, so that Ray pickles it and a reader
    sees what the work is given)."""

    config: LocalizeConfig
    max_batch_rows: int | None = None

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return localize_work(lm, self.config, self.max_batch_rows)


def per_fact(facts: Sequence[Fact], values: Sequence[T]) -> list[list[T]]:
    """``values`` (one per query, the facts' queries in order) split into one list per fact."""
    split, start = [], 0
    for fact in facts:
        split.append(list(values[start : start + len(fact.queries)]))
        start += len(fact.queries)
    return split


def write_fact(
    writer: UnitWriter,
    fact: Fact,
    method: str,
    config: LocalizeConfig,
    cloze: Sequence[ClozeScore],
    attributed: Sequence[tuple[Attribution, float]],
) -> None:
    """One fact's rows for one method: a KN set per query (and its dense scores where kept), and
    the fact's CAS set from the same per-query scores."""
    for index, (prompt, knows, (result, seconds)) in enumerate(zip(fact.queries, cloze, attributed)):
        kn = config.attribution.kn_set(result)
        writer.add(
            KnSetRow(
                fact_id=fact.id,
                relation=fact.relation,
                method=method,
                query_index=index,
                prompt=prompt,
                answer=fact.object,
                kn=[list(u) for u in kn],
                kn_size=len(kn),
                max_score=float(result.scores.max()),
                top=[[layer, i, round(v, 8)] for layer, i, v in result.top(config.top_scores)],
                prob=knows.prob,
                rank=knows.rank,
                f_input=float(result.f_input[0]),
                max_residual=float(result.completeness_residual.max()),
                seconds=round(seconds, 3),
            )
        )
        if config.save_scores:
            writer.add(DenseScoresRow(fact.id, method, index, compress_scores(result.scores.numpy())))
    per_query = [result.scores for result, _ in attributed]
    cas = cas_set(per_query, config.cas_beta1, config.cas_beta2, config.cas_threshold)
    writer.add(CasSetRow(fact.id, fact.relation, method, [list(u) for u in cas], len(cas)))


def timed_attributions(
    lm: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    method: str,
    config: LocalizeConfig,
    max_batch_rows: int | None,
) -> list[tuple[Attribution, float]]:
    """Each query attributed with ``method``, and the seconds it took. A first-order method
    attributes the queries together (those of one prompt length share each pass), and each is
    charged an equal share of the time; a path method runs query by query."""
    settings = config.attribution
    warn = False  # the residual is stored with every query
    if not prompts:
        return []
    if issubclass(METHODS[method], FirstOrder):
        started = time.perf_counter()
        results = attribute_many(
            lm, prompts, answers, method, max_batch_rows=max_batch_rows, warn=warn, settings=settings
        )
        share = (time.perf_counter() - started) / len(results)
        return [(result, share) for result in results]
    timed = []
    for prompt, answer in zip(prompts, answers):
        started = time.perf_counter()
        result = attribute(
            lm, prompt, answer, method, max_batch_rows=max_batch_rows, warn=warn, settings=settings
        )
        timed.append((result, time.perf_counter() - started))
    return timed


FACTS_PER_UNIT_HELP = (
    "Facts per unit of work (stored and resumed together): above 1, the first-order methods (gxa, "
    "gxa-amig) batch the queries of a unit's facts, which path methods cannot use."
)


@dataclass(frozen=True)
class LocalizeRequest:
    run_dir: Path = setting(help="Run directory (created, or resumed).")
    model: str = setting(DEFAULT_MODEL)
    config: LocalizeConfig = setting(factory=LocalizeConfig)
    selection: Selection = setting(factory=lambda: Selection(facts_per_relation=1))
    max_batch_rows: int | None = setting(None)
    facts_per_unit: int = setting(1, FACTS_PER_UNIT_HELP)
    known: int | None = setting(None, word="all")
    census_dir: Path | None = setting(None, CENSUS_DIR_HELP, flag="--census")
    known_pool: int | None = setting(None, KNOWN_POOL_HELP)
    device: str = setting(DEFAULT_DEVICE)
    dtype: str = setting(DEFAULT_DTYPE)
    execution: Execution = setting(factory=Execution)


def run(request: LocalizeRequest) -> Outcome:
    selection = request.selection
    params = {"model": request.model, "dtype": request.dtype, **selection.params(), **request.config.params()}
    if request.facts_per_unit != 1:  # recorded only when chosen, so that older runs resume
        check_facts_per_unit(request.facts_per_unit, request.config.methods)
        params["facts_per_unit"] = request.facts_per_unit
    if request.known is None:
        if request.census_dir is not None or request.known_pool is not None:
            raise ConfigError(
                lambda name: (
                    f"{name('census_dir')} and {name('known_pool')} choose the census of "
                    f"{name('known')}; give {name('known')} K with them"
                )
            )
        _, facts = selection.select()
    else:
        # Without the known filter the parameters stay as before, so older runs resume.
        params.update(known=request.known, known_pool=request.known_pool)
        RunStore.check_stage(request.run_dir, STAGE, params)  # refuse another localize run before the census
        facts = known_facts(
            request.known,
            selection,
            request.run_dir,
            request.model,
            request.device,
            request.execution,
            request.census_dir,
            request.known_pool,
        )
    ordered = interleave_relations(facts)  # the order of work only: a run stopped early spans all relations
    units = ordered if request.facts_per_unit == 1 else fact_chunks(ordered, request.facts_per_unit)
    plan = SweepPlan(
        request.run_dir,
        STAGE,
        params,
        units,
        LocalizeWorkBuilder(request.config, request.max_batch_rows),
        ModelSpec(request.model, request.device, request.dtype),
        f"localize {request.model}",
        required_table=KnSetRow.table,
        source=selection.source,
    )
    summary = execute(plan, request.execution)
    return Outcome([f"facts: {summary.describe()}; results in {request.run_dir}"])


SAMPLE_KNOWN_POOL = 64
"""Facts per relation that ``demo`` and ``reproduce --scale sample`` census for the known filter."""
SCALES: dict[str, dict[str, Any]] = {
    # sample: a few facts through every stage, within an hour on 2 CPU cores for a 135M model; with
    # the known filter, the facts come from a census of a pool per relation, not of all ParaRel.
    "sample": {"facts_per_relation": 1, "limit": 4, "known_pool": SAMPLE_KNOWN_POOL},
    # full: every fact of ParaRel with >= 2 usable queries.
    "full": {"facts_per_relation": None, "limit": None, "known_pool": None},
}


def reproduce(plan: Reproduction) -> list[tuple[str, Any]]:
    scale = SCALES[plan.scale]
    limit = plan.facts if plan.facts is not None else scale["limit"]
    selection = Selection(facts_per_relation=scale["facts_per_relation"], limit=limit, seed=plan.seed)
    request = LocalizeRequest(
        run_dir=plan.directory,
        model=plan.model,
        selection=selection,
        known=plan.known,
        known_pool=scale["known_pool"] if plan.known is not None else None,
        device=plan.device,
        dtype=plan.dtype,
        execution=plan.execution,
    )
    return [("localize (IG, AMIG, SIG)", request)]


STUDY = Study(
    name="localize",
    summary="The localization sweep: KN sets of every usable query of every sampled fact, with each "
    "method (resumable; one transaction per fact). The default samples 1 fact per relation; with "
    "--known K, only among the facts the model knows (a census comes first).",
    request=LocalizeRequest,
    run=run,
    examples=(
        "qloc localize --model smollm2-135m --known 1 --run-dir runs/known  "
        "# only facts it knows (census of their relations first)",
        "qloc localize --model smollm2-135m --methods ig,amig,sig --run-dir runs/smollm2   "
        "# 1 fact per relation",
    ),
    reproduce=reproduce,
)
