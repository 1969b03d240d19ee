"""The known filter (``--known K``; METHODS.md section 9): the queries whose answer's first token a
census ranks below K, and the facts with at least two of them; the run's sample is drawn from those
facts, each keeping only its known queries."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.pararel import Fact, sample_facts
from ..data.selection import Selection
from ..engine.cloze import EXACT_RANKS
from ..errors import NOTE, ConfigError, QlocError
from ..runs.executors import Execution, execute
from ..runs.store import RunStore
from .census import MIN_KNOWN_QUERIES, STAGE, CensusConfig, CensusRow, census_plan

log = logging.getLogger("qloc")


LOOKUP_PARAMS = ("model", "data", "query_filter")
"""What a census given with ``--census`` must share with the localize run that reads it."""


CENSUS_DIR_HELP = (
    "With --known: a census run of the same model, data and query filter (default: census the "
    "candidate facts into --run-dir)."
)


KNOWN_POOL_HELP = (
    "With --known: census a seeded sample of N facts per relation and sample among its known facts "
    "(default: every fact)."
)


def known_facts(
    k: int,
    selection: Selection,
    run_dir: Path,
    model: str,
    device: str,
    execution: Execution,
    census_dir: Path | None = None,
    known_pool: int | None = None,
) -> list[Fact]:
    """The facts of the known filter: the candidates (every fact of the selected relations, or a
    seeded pool of ``known_pool`` per relation) are looked up in the census (scored first, into
    ``run_dir``, unless ``census_dir`` names one); each keeps its queries ranked below ``k``, facts
    with >= 2 survive, and the selection's seeded sample is drawn from the survivors."""
    if known_pool is not None and known_pool < 1:
        raise ConfigError.invalid("known_pool", known_pool, "must be at least 1")
    pool = replace(selection, facts_per_relation=known_pool, limit=None)
    _, candidates = pool.select(announce=False)
    census_params = {"model": model, **pool.params()}
    if census_dir is None:
        # Ranks from 10 on are exact only in float32 (a bfloat16 census re-scores just the top).
        config = CensusConfig("float32" if k > EXACT_RANKS else "auto")
        execute(census_plan(run_dir, model, device, candidates, census_params, config), execution)
    rows = read_census(census_dir or run_dir, candidates, census_params)
    kept = keep_known(candidates, rows, k)
    selected = sample_facts(kept, None, selection.facts_per_relation, selection.limit, selection.seed)
    kept_queries = sum(len(f.queries) for f in kept)
    log.log(
        NOTE,
        f"known filter K = {k}: {len(kept)} of {len(candidates)} facts have >= 2 queries ranked below "
        f"{k} ({kept_queries} of {len(rows)} queries kept); {len(selected)} facts sampled",
    )
    if not selected:
        raise ConfigError(
            lambda name: (
                f"{name('known')} {k}: no fact of the selected relations has >= 2 queries "
                f"ranked below {k}; try a larger K, more relations or a larger {name('known_pool')}"
            )
        )
    return selected


def read_census(run_dir: Path, facts: Sequence[Fact], expected: dict[str, Any]) -> pd.DataFrame:
    """The census rows of ``facts`` from the census stage in ``run_dir``. Refuses a census of
    another model, data file or query filter than ``expected`` names (naming the parameter), and
    one that has not scored every fact of ``facts``."""
    with RunStore.open_existing(run_dir) as store:
        params = store.params(STAGE)
        for key in LOOKUP_PARAMS:
            if params.get(key) != expected.get(key):
                raise QlocError(
                    f"census {str(run_dir)!r} was made with {key} {params.get(key)!r}; "
                    f"this run uses {expected.get(key)!r}"
                )
        tables = store.tables()
        empty = pd.DataFrame(columns=list(CensusRow.defaults()))
        rows = store.frame(CensusRow) if STAGE in tables else empty
        skipped = store.frame("census_skipped")["fact_id"] if "census_skipped" in tables else []
    covered = set(rows["fact_id"]) | set(skipped)
    missing = [f for f in facts if f.id not in covered]
    if missing:
        relations = ",".join(sorted({f.relation for f in missing}))
        raise QlocError(
            f"census {str(run_dir)!r} has not scored {len(missing)} of the {len(facts)} facts to "
            f"filter (e.g. {missing[0].id}); run `qloc census --run-dir {run_dir} --relations "
            f"{relations}` with its model first, or leave out --census to score them here"
        )
    return rows[rows["fact_id"].isin({f.id for f in facts})]


def keep_known(facts: Sequence[Fact], census: pd.DataFrame, k: int) -> list[Fact]:
    """Each fact with only its queries whose first answer token ranks below ``k`` (in query
    order), and only the facts left with at least MIN_KNOWN_QUERIES of them."""
    if k > EXACT_RANKS and (census["scored_in"] == "bfloat16").any():  # older censuses read None
        raise QlocError(
            f"--known {k}: the census scored some queries in bfloat16, whose ranks are exact "
            f"only below {EXACT_RANKS}; use a census made with --census-dtype float32"
        )
    rows = {(r.fact_id, r.query_index): r for r in census.itertuples()}
    kept = []
    for fact in facts:
        known = []
        for index, prompt in enumerate(fact.queries):
            row = rows.get((fact.id, index))
            if row is None:
                continue  # the census skipped the fact: its answer has no tokens
            if row.prompt != prompt:
                raise QlocError(
                    f"the census's query {index} of fact {fact.id} is {row.prompt!r}, the "
                    f"data's is {prompt!r}: the census was made from other data"
                )
            if row.rank < k:
                known.append(prompt)
        if len(known) >= MIN_KNOWN_QUERIES:
            kept.append(replace(fact, queries=tuple(known)))
    return kept
