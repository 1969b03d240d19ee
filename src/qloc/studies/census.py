"""The census (``qloc census``): which queries a model answers, before anything is localized.

For every usable query of the chosen facts: the rank (0 = top-1) and probability of the answer's
first token at the last prompt position, and the model's own top-1 token (METHODS.md section 9).
Only the prompt is read (no teacher-forced answer tokens), queries are grouped by exact prompt
length so that a batch holds no padding, and only the last position goes through the output head.

The scoring itself is :class:`qloc.engine.cloze.FirstTokenScorer` (batched by prompt length;
float32, or bfloat16 with fp32 re-scoring near the top; ``auto`` picks the faster exact mode).
The known filter (:mod:`qloc.studies.known`) reads a census to keep the facts a model knows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..data.pararel import Fact
from ..data.selection import Selection
from ..engine.cloze import PRECISIONS, FirstTokenScorer
from ..engine.models import DEFAULT_DEVICE, DEFAULT_MODEL, LoadedModel
from ..engine.tokens import answer_token_ids
from ..errors import ConfigError, DataError, QlocError
from ..runs.executors import Execution, ModelSpec, SweepPlan, execute
from ..runs.outputs import save_figure, write_table
from ..runs.rows import Row, UnitWriter
from ..runs.store import RunStore
from ..runs.sweep import WorkFn
from ..settings import setting
from .registry import Outcome, Panel, Study

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGE = "census"
BATCH_SIZE = 128
CALIBRATION_QUERIES = 256
CHUNK_FACTS = 256
MIN_KNOWN_QUERIES = 2
"""A fact is known when at least this many of its queries are (as a fact needs 2 queries to be used)."""
log = logging.getLogger("qloc")


# -- the census sweep -------------------------------------------------------------------------
@dataclass(frozen=True)
class CensusChunk:
    """One unit of the census: up to CHUNK_FACTS facts of one relation, in dataset order."""

    facts: tuple[Fact, ...]

    @property
    def id(self) -> str:
        first, last = (f.id.rsplit("/", 1)[1] for f in (self.facts[0], self.facts[-1]))
        return f"{self.facts[0].relation}/{first}-{last}"

    @property
    def label(self) -> str:
        return f"census of facts {self.id} ({len(self.facts)} facts)"

    @property
    def size(self) -> int:
        """Queries: the census's progress bar counts these."""
        return sum(len(f.queries) for f in self.facts)


def census_chunks(facts: Sequence[Fact], chunk_facts: int = CHUNK_FACTS) -> list[CensusChunk]:
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_relation[fact.relation].append(fact)
    return [
        CensusChunk(tuple(group[start : start + chunk_facts]))
        for group in by_relation.values()
        for start in range(0, len(group), chunk_facts)
    ]


def calibration_sample(facts: Sequence[Fact], count: int = CALIBRATION_QUERIES) -> list[tuple[str, str]]:
    """(prompt, answer) pairs spread evenly over all queries of ``facts``: the same for a run and
    its resumption, so the bf16 margin is too."""
    pairs = [(q, f.object) for f in facts for q in f.queries]
    step = max(1, len(pairs) // count)
    return pairs[::step][:count]


@dataclass
class CensusRow(Row):
    """One query: the rank and probability of its answer's first token, and the model's top-1 token."""

    table = STAGE
    fact_id: str
    relation: str
    query_index: int
    prompt: str
    answer: str
    answer_token: int
    prob: float
    rank: int
    top_token: str
    scored_in: str


@dataclass
class CensusSkippedRow(Row):
    """A fact whose answer or a prompt has no tokens."""

    table = "census_skipped"
    fact_id: str
    relation: str
    reason: str


@dataclass
class CensusPrecisionRow(Row):
    """One chunk: its precision, the bf16 margin, and how many queries were scored in fp32."""

    table = "census_precision"
    precision: str
    margin: float
    calibrated_error: float
    queries: int
    float32_queries: int


def census_work(
    lm: LoadedModel, precision: str, batch_size: int, calibration: Sequence[tuple[str, str]]
) -> WorkFn:
    """Work function over :class:`CensusChunk` s: one ``census`` row per query, one
    ``census_skipped`` row per fact whose answer or a prompt has no tokens, and one
    ``census_precision`` row per chunk (the precision, margin and re-scored queries)."""
    pairs = []
    for prompt, answer in calibration:
        try:
            pairs.append((lm.tokenizer(prompt).input_ids, _answer_token(lm, answer)))
        except DataError:
            continue  # the census skips such a fact too
    scorer = FirstTokenScorer(lm, precision, batch_size, [(ids, token) for ids, token in pairs if ids])
    decode = lru_cache(maxsize=None)(lambda token: lm.tokenizer.decode([token]))

    def work(chunk: CensusChunk, writer: UnitWriter) -> None:
        queries = []  # (fact, query index, prompt ids, answer token)
        for fact in chunk.facts:
            try:
                answer = _answer_token(lm, fact.object)
                prompt_ids = lm.tokenizer(list(fact.queries)).input_ids
                if not all(prompt_ids):
                    raise DataError(f"a prompt of fact {fact.id} tokenizes to no tokens")
            except DataError as exc:
                writer.add(CensusSkippedRow(fact.id, fact.relation, str(exc)))
                continue
            queries += [(fact, i, ids, answer) for i, ids in enumerate(prompt_ids)]
        scores = scorer.score([q[2] for q in queries], [q[3] for q in queries])
        if queries:
            writer.add(
                [
                    CensusRow(
                        fact.id,
                        fact.relation,
                        index,
                        fact.queries[index],
                        fact.object,
                        answer,
                        s.prob,
                        s.rank,
                        decode(s.top_token),
                        s.scored_in,
                    )
                    for (fact, index, _, answer), s in zip(queries, scores)
                ]
            )
        float32 = sum(s.scored_in == "float32" for s in scores)
        writer.add(
            CensusPrecisionRow(
                scorer.precision, scorer.margin, scorer.calibrated_error, len(queries), float32
            )
        )

    return work


@dataclass(frozen=True)
class CensusWorkBuilder:
    """The census sweep's :data:`~qloc.runs.executors.WorkBuilder`: each model replica builds
    :func:`census_work` from it (a dataclass, so that Ray pickles it)."""

    precision: str
    batch_size: int
    calibration: Sequence[tuple[str, str]]

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return census_work(lm, self.precision, self.batch_size, self.calibration)


def _answer_token(lm: LoadedModel, answer: str) -> int:
    return answer_token_ids(lm, answer)[0]


@dataclass(frozen=True)
class CensusConfig:
    """What a census stores as its parameters beside the model and the fact selection."""

    precision: str = setting(
        "auto",
        "auto (float32 on CPUs, bfloat16 on GPUs), float32, or bfloat16 (queries near the top-10 "
        "re-scored in fp32: ranks below 10 stay exact).",
        flag="--census-dtype",
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError.invalid("precision", self.precision, f"choose {', '.join(PRECISIONS)}")


def census_plan(
    run_dir: Path,
    model: str,
    device: str,
    facts: Sequence[Fact],
    params: dict[str, Any],
    config: CensusConfig,
    batch_size: int = BATCH_SIZE,
) -> SweepPlan:
    """The census of ``facts`` as a sweep (local or Ray), stage ``census`` in ``run_dir``."""
    if batch_size < 1:
        raise ConfigError.invalid("batch_size", batch_size, "must be at least 1")
    calibration = calibration_sample(facts) if config.precision != "float32" else []
    build = CensusWorkBuilder(config.precision, batch_size, calibration)
    return SweepPlan(
        run_dir,
        STAGE,
        {**params, "precision": config.precision},
        census_chunks(facts),
        build,
        ModelSpec(model, device, "float32"),
        f"census {model} (queries)",
    )


@dataclass(frozen=True)
class CensusRequest:
    run_dir: Path = setting(help="Run directory (created, or resumed).")
    model: str = setting(DEFAULT_MODEL)
    selection: Selection = setting(factory=Selection)
    config: CensusConfig = setting(factory=CensusConfig)
    batch_size: int = setting(BATCH_SIZE, "Queries per forward pass (all of one length).")
    device: str = setting(DEFAULT_DEVICE)
    execution: Execution = setting(factory=Execution)


def run(request: CensusRequest) -> Outcome:
    dataset, selected = request.selection.select()
    params = {"model": request.model, **request.selection.params()}
    plan = census_plan(
        request.run_dir, request.model, request.device, selected, params, request.config, request.batch_size
    )
    summary = execute(plan, request.execution)
    with RunStore.open_existing(request.run_dir) as store:
        if STAGE not in store.tables():
            raise QlocError(
                f"no fact of {str(request.run_dir)!r} could be scored ({dict(summary.skip_reasons)})"
            )
        rows, seconds = store.frame(STAGE), store.units(STAGE)["seconds"].sum()
    table = census_table(rows, {f.relation: f.relation_label for f in dataset.facts})
    csv = write_table(table, request.run_dir / "tables", "census_relations")
    png = save_figure(census_figure(table, request.model), request.run_dir / "figures", "census_relations")
    rescored = (rows["scored_in"] == "float32").mean()
    speed = len(rows) / max(seconds, 1e-9)
    return Outcome(
        [
            table,
            f"chunks: {summary.describe()}; {len(rows)} queries in {seconds:.0f} s of scoring "
            f"({speed:.1f} queries/s; {100 * rescored:.0f}% scored in float32); {csv}, {png}",
        ]
    )


# -- reading a census: the per-relation table and figure -------------------------------------


def census_table(census: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Per relation and for all: facts, queries, the shares of queries whose answer ranks top-1
    and top-10, the shares of facts with >= 2 such queries, and the median rank and probability."""
    census = census.assign(top1=census["rank"] < 1, top10=census["rank"] < 10)
    per_fact = census.groupby("fact_id").agg(
        relation=("relation", "first"), top1=("top1", "sum"), top10=("top10", "sum")
    )

    def summary(queries: pd.DataFrame, facts: pd.DataFrame) -> dict:
        return {
            "facts": len(facts),
            "queries": len(queries),
            "queries_top1": queries["top1"].mean(),
            "queries_top10": queries["top10"].mean(),
            "facts_top1": (facts["top1"] >= MIN_KNOWN_QUERIES).mean(),
            "facts_top10": (facts["top10"] >= MIN_KNOWN_QUERIES).mean(),
            "median_rank": float(queries["rank"].median()),
            "median_prob": float(queries["prob"].median()),
        }

    rows = [
        {
            "relation": relation,
            "label": (labels or {}).get(relation, ""),
            **summary(group, per_fact[per_fact["relation"] == relation]),
        }
        for relation, group in census.groupby("relation", sort=False)
    ]
    # Wikidata order (P19 before P103); other relation names after them, alphabetically.
    rows.sort(
        key=lambda r: (
            (0, int(r["relation"][1:]), "") if r["relation"][1:].isdigit() else (1, 0, r["relation"])
        )
    )
    rows.append({"relation": "all", "label": "", **summary(census, per_fact)})
    return pd.DataFrame(rows)


def census_figure(table: pd.DataFrame, model: str) -> Figure:
    """Per relation: the share of queries (left) and of facts with >= 2 queries (right) whose
    answer the model ranks top-10 (light) and top-1 (dark); the all-relations share dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = table[table["relation"] == "all"].iloc[0]
    table = table[table["relation"] != "all"].sort_values("queries_top10")
    names = [
        f"{r.relation} {r.label.split('(', 1)[-1].rstrip(')')}".strip() if r.label else r.relation
        for r in table.itertuples()
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.24 * len(table) + 1.6), sharey=True)
    for ax, unit in zip(axes, ("queries", "facts")):
        ax.barh(names, 100 * table[f"{unit}_top10"], color="#9ecae1", label="top-10")
        ax.barh(names, 100 * table[f"{unit}_top1"], color="#08519c", label="top-1")
        for column, color in ((f"{unit}_top10", "#6baed6"), (f"{unit}_top1", "#08306b")):
            ax.axvline(100 * overall[column], color=color, linestyle="--", linewidth=0.9)
        ax.set_xlabel(f"% of {unit} known" + (" (>= 2 queries)" if unit == "facts" else ""))
        ax.set_xlim(0, 100)
        ax.margins(y=0.01)
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(loc="lower right", fontsize=8, frameon=False)
    fig.suptitle(
        f"What {model} knows of ParaRel: the answer's first token ranked top-1 / top-10\n"
        f"{int(overall['queries']):,} queries of {int(overall['facts']):,} facts; "
        "dashed lines: all relations",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


STUDY = Study(
    name="census",
    summary="What the model knows: rank and probability of the answer's first token after every usable "
    "query of the selected facts (default: all of ParaRel), in chunks of 256 facts (resumable); "
    "tables/census_relations.csv|md and figures/census_relations.png|svg per relation.",
    request=CensusRequest,
    run=run,
    panels=(Panel(130, "What the model knows, per relation", ("census_relations",)),),
    captions={
        "census_relations": (
            "Per relation: share of queries and of facts whose answer the model ranks first (top-1) or in "
            "its top 10: how much of ParaRel the model knows."
        )
    },
    examples=(
        "qloc census --model smollm2-135m --run-dir runs/census-smollm2 "
        "# what the model knows: every query's answer rank",
    ),
)
