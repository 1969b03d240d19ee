"""The census (``qloc census``): which queries a model answers, before anything is localized.

For every usable query of the chosen facts: the rank (0 = top-1) and probability of the answer's
first token at the last prompt position, and the model's own top-1 token (METHODS.md section 9).
Only the prompt is read (no teacher-forced answer tokens), queries are grouped by exact prompt
length so that a batch holds no padding, and only the last position goes through the output head.

Precision: ``float32`` scores everything in fp32. ``bfloat16`` runs a bf16 copy of the model and
re-scores in fp32 every query whose answer logit lies within a calibrated margin of the
``EXACT_RANKS``-th best logit, so that every rank below ``EXACT_RANKS`` (and so top-1 and top-10
membership) is the fp32 one; the margin is twice the worst bf16 error of logit differences seen on
a calibration sample, plus a floor. ``auto`` is float32 on CPUs (bf16 with the re-scoring is slower
there: benchmarks/NOTES.md) and bfloat16 on GPUs that support it.

``--known K`` (:func:`keep_known`) keeps the queries whose first answer token ranks below K and
the facts with at least two of them; sampling comes after that filter.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path

import pandas as pd
import torch

from ..data.pararel import Fact
from ..engine.models import LoadedModel
from ..engine.tokens import answer_token_ids
from ..errors import DataError, QlocError
from ..runs.executors import ModelSpec, SweepPlan
from ..runs.store import RunStore, UnitWriter

STAGE = "census"
PRECISIONS = ("auto", "float32", "bfloat16")
EXACT_RANKS = 10
"""bfloat16 census: a rank below this is the fp32 rank; a larger one is bf16's (approximate)."""
MARGIN_FLOOR = 0.5
"""Logits added to the calibrated bf16 margin, for errors larger than any in the sample."""
CALIBRATION_QUERIES = 256
CHUNK_FACTS = 256
MIN_KNOWN_QUERIES = 2
"""A fact is known when at least this many of its queries are (as a fact needs 2 queries to be used)."""
LOOKUP_PARAMS = ("model", "data", "query_filter")
"""What a census given with ``--census`` must share with the localize run that reads it."""


@dataclass(frozen=True)
class FirstTokenScore:
    rank: int
    """Rank of the answer's first token among the vocabulary, 0 = top-1 (ties rank best)."""
    prob: float
    """P(answer token 0 | prompt), softmax in fp32."""
    top_token: int
    """The model's top-1 next token."""
    scored_in: str
    """float32, or bfloat16 where the bf16 numbers were kept (rank >= EXACT_RANKS for certain)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> the faster of the exact modes on ``device``; float32 and bfloat16 stay."""
    if precision not in PRECISIONS:
        raise QlocError(f"--census-dtype {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


class FirstTokenScorer:
    """Rank and probability of answer token 0 after many prompts, batched by prompt length.

    ``lm`` must hold float32 weights (the reference every precision is exact against). With
    ``precision="bfloat16"`` a bf16 copy of the model is made and ``calibration`` (prompt ids,
    answer token) pairs set the margin inside which a query is re-scored in fp32."""

    def __init__(
        self,
        lm: LoadedModel,
        precision: str = "float32",
        batch_size: int = 128,
        calibration: Sequence[tuple[Sequence[int], int]] = (),
    ) -> None:
        if lm.dtype != torch.float32:
            raise QlocError(f"the census scores against float32 weights; {lm.name!r} is loaded in {lm.dtype}")
        if batch_size < 1:
            raise QlocError(f"--batch-size {batch_size}: must be at least 1")
        self.lm, self.batch_size = lm, batch_size
        self.precision = resolve_precision(precision, lm.device)
        self.fast_model = None
        self.margin = math.nan
        self.calibrated_error = math.nan
        if self.precision == "bfloat16":
            if not calibration:
                raise QlocError("a bfloat16 census needs calibration queries to set its fp32 margin")
            self.fast_model = copy.deepcopy(lm.model).to(torch.bfloat16)
            self.calibrated_error = self._calibrate(calibration)
            self.margin = 2 * self.calibrated_error + MARGIN_FLOOR

    @torch.inference_mode()
    def _calibrate(self, calibration: Sequence[tuple[Sequence[int], int]]) -> float:
        """The worst error of any logit difference (max minus min of bf16 - fp32 over the
        vocabulary: a shift common to all logits changes no rank) on the calibration queries."""
        worst = 0.0
        prompts = [ids for ids, _ in calibration]
        for rows in self._batches(prompts):
            ids = torch.tensor([prompts[i] for i in rows], device=self.lm.device)
            error = _last_logits(self.fast_model, ids) - _last_logits(self.lm.model, ids)
            worst = max(worst, float((error.max(1).values - error.min(1).values).max()))
        return worst

    def _batches(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Row indices grouped by exact prompt length (no padding), at most batch_size per batch."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(prompts):
            if not ids:
                raise DataError(f"prompt {index} tokenizes to no tokens")
            by_length[len(ids)].append(index)
        return [
            rows[start : start + self.batch_size]
            for _, rows in sorted(by_length.items())
            for start in range(0, len(rows), self.batch_size)
        ]

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], answer_tokens: Sequence[int]) -> list[FirstTokenScore]:
        """Score ``answer_tokens[i]`` after the token ids ``prompts[i]`` (special tokens included)."""
        if len(prompts) != len(answer_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(answer_tokens)} answer tokens")
        results: list[FirstTokenScore | None] = [None] * len(prompts)
        for rows in self._batches(prompts):
            ids = torch.tensor([prompts[i] for i in rows], device=self.lm.device)
            answers = torch.tensor([answer_tokens[i] for i in rows], device=self.lm.device)
            for row, result in zip(rows, self._score_batch(ids, answers)):
                results[row] = result
        return results

    def _score_batch(self, ids: torch.Tensor, answers: torch.Tensor) -> list[FirstTokenScore]:
        if self.fast_model is None:
            return _first_token_scores(_last_logits(self.lm.model, ids), answers, "float32")
        logits = _last_logits(self.fast_model, ids)
        answer_logit = logits.gather(1, answers[:, None])[:, 0]
        # Below the EXACT_RANKS-th logit by more than the margin: at least EXACT_RANKS tokens beat
        # the answer in fp32 too, so its rank is >= EXACT_RANKS in both precisions.
        boundary = logits.topk(EXACT_RANKS, dim=1).values[:, -1]
        recheck = (answer_logit >= boundary - self.margin).nonzero()[:, 0]
        results = _first_token_scores(logits, answers, "bfloat16")
        if len(recheck):
            exact_logits = _last_logits(self.lm.model, ids[recheck])
            exact = _first_token_scores(exact_logits, answers[recheck], "float32")
            for row, result in zip(recheck.tolist(), exact):
                results[row] = result
        return results


def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [batch, vocab] at the last position; only that position reaches the head."""
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def _first_token_scores(logits: torch.Tensor, answers: torch.Tensor, scored_in: str) -> list[FirstTokenScore]:
    # Rank on log-probabilities, as score_cloze computes it, so both agree on near-ties.
    logprobs = torch.log_softmax(logits, dim=-1)
    answer_logprob = logprobs.gather(1, answers[:, None])
    ranks = (logprobs > answer_logprob).sum(1).tolist()
    probs = answer_logprob[:, 0].exp().tolist()
    tops = logprobs.argmax(1).tolist()
    return [FirstTokenScore(r, p, t, scored_in) for r, p, t in zip(ranks, probs, tops)]


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


def census_work(lm: LoadedModel, precision: str, batch_size: int, calibration: Sequence[tuple[str, str]]):
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
                writer.add(
                    "census_skipped", {"fact_id": fact.id, "relation": fact.relation, "reason": str(exc)}
                )
                continue
            queries += [(fact, i, ids, answer) for i, ids in enumerate(prompt_ids)]
        scores = scorer.score([q[2] for q in queries], [q[3] for q in queries])
        if queries:
            writer.add(
                STAGE,
                [
                    {
                        "fact_id": fact.id,
                        "relation": fact.relation,
                        "query_index": index,
                        "prompt": fact.queries[index],
                        "answer": fact.object,
                        "answer_token": answer,
                        "prob": s.prob,
                        "rank": s.rank,
                        "top_token": decode(s.top_token),
                        "scored_in": s.scored_in,
                    }
                    for (fact, index, _, answer), s in zip(queries, scores)
                ],
            )
        writer.add(
            "census_precision",
            {
                "precision": scorer.precision,
                "margin": scorer.margin,
                "calibrated_error": scorer.calibrated_error,
                "queries": len(queries),
                "float32_queries": sum(s.scored_in == "float32" for s in scores),
            },
        )

    return work


def _answer_token(lm: LoadedModel, answer: str) -> int:
    return answer_token_ids(lm, answer)[0]


def census_plan(
    run_dir: Path,
    model: str,
    device: str,
    facts: Sequence[Fact],
    params: dict,
    precision: str,
    batch_size: int,
) -> SweepPlan:
    """The census of ``facts`` as a sweep (local or Ray), stage ``census`` in ``run_dir``."""
    if precision not in PRECISIONS:
        raise QlocError(f"--census-dtype {precision!r}: choose {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise QlocError(f"--batch-size {batch_size}: must be at least 1")
    calibration = calibration_sample(facts) if precision != "float32" else []
    build = partial(census_work, precision=precision, batch_size=batch_size, calibration=calibration)
    return SweepPlan(
        run_dir,
        STAGE,
        {**params, "precision": precision},
        census_chunks(facts),
        build,
        ModelSpec(model, device, "float32"),
        f"census {model} (queries)",
    )


# -- reading a census: the known filter, the per-relation table and figure ----------------------
def parse_known(value: str | int | None) -> int | None:
    """``--known``: an int K >= 1 (known at top-K), or ``all`` (None: no filter)."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        k = int(str(value).strip())
    except ValueError:
        k = 0
    if k < 1:
        raise QlocError(f"--known {value!r}: give an integer K >= 1 (answer ranked below K) or 'all'")
    return k


def read_census(run_dir: Path, facts: Sequence[Fact], expected: dict) -> pd.DataFrame:
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
        empty = pd.DataFrame(columns=["fact_id", "query_index", "prompt", "rank"])
        rows = store.frame(STAGE) if STAGE in tables else empty
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
    if k > EXACT_RANKS and "scored_in" in census and (census["scored_in"] == "bfloat16").any():
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


def census_figure(table: pd.DataFrame, model: str):
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
