"""The census engine against today's cloze scoring, side by side on the same queries.

    .venv/bin/python benchmarks/census.py [--model smollm2-135m] [--queries 6000] [--batch-size 128]
                                          [--seed 0]

A seeded sample of facts (at least ``--queries`` usable queries, all relations) is scored three
ways, each through the work function its command runs (tokenization and row building included,
the run store left out): ``qloc cloze`` today (``score_cloze`` per fact, batches of 16 padded
queries, every position and the teacher-forced answer through the head), the census in float32,
and the census in bfloat16 with fp32 re-scoring near the top-10. The sample is cut into slices of
256 facts, a census chunk's size (the census batches a chunk's queries by prompt length, so its
batches are as large as in a full census), and the three run in turn on each slice, so that load
from other work on a shared machine falls on all three alike; the printed rates and ratios come
from the summed times. Each way first runs once on a few other facts, untimed (one-off start-up
costs), and the bfloat16 margin's calibration (once per session) is timed apart. Then: the
projected time of a census of every usable query of ParaRel, and the agreement of bfloat16 with
float32 and of the census with today's scores.
"""

from __future__ import annotations

import argparse
import random
import time

import pandas as pd

import qloc
from qloc.runs.rows import UnitWriter
from qloc.studies.census import CHUNK_FACTS, CensusChunk, calibration_sample, census_work
from qloc.studies.cloze import cloze_sweep_work


def sample_facts(facts: list[qloc.Fact], queries: int, seed: int) -> tuple[list[qloc.Fact], list[qloc.Fact]]:
    """Facts of all relations with at least ``queries`` queries in all, and 20 others to warm up on."""
    shuffled = random.Random(seed).sample(facts, len(facts))
    chosen, total = [], 0
    for fact in shuffled[20:]:
        if total >= queries:
            break
        chosen.append(fact)
        total += len(fact.queries)
    return chosen, shuffled[:20]


def timed(work, units) -> tuple[float, list[dict]]:
    writer = UnitWriter()
    started = time.perf_counter()
    for unit in units:
        work(unit, writer)
    return time.perf_counter() - started, writer.rows.get("census", writer.rows.get("cloze", []))


def agreement(fast: pd.DataFrame, exact: pd.DataFrame) -> dict[str, float]:
    """How the bfloat16 census's rows agree with the float32 census's (both indexed by query)."""
    fast_rank, exact_rank = fast["rank"], exact["rank"]
    near_top = (fast_rank < 10) | (exact_rank < 10)
    differ = fast_rank != exact_rank
    relative = (fast["prob"] - exact["prob"]).abs() / exact["prob"]
    return {
        "re-scored in fp32": (fast["scored_in"] == "float32").mean(),
        "top-1 membership equal": ((fast_rank == 0) == (exact_rank == 0)).mean(),
        "top-10 membership equal": ((fast_rank < 10) == (exact_rank < 10)).mean(),
        "rank equal where either < 10": (~differ[near_top]).mean(),
        "rank equal overall": (~differ).mean(),
        "median |rank diff| where unequal": (fast_rank - exact_rank).abs()[differ].median(),
        "P(o) max relative diff": relative.max(),
        "P(o) median relative diff": relative.median(),
        "top token equal": (fast["top_token"] == exact["top_token"]).mean(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = qloc.load_pararel().facts
    all_queries = sum(len(f.queries) for f in dataset)
    facts, warm_up = sample_facts(dataset, args.queries, args.seed)
    lm = qloc.load_model(args.model, device="cpu")
    today, exact, fast = (
        "today: score_cloze per fact, batch 16",
        "census float32",
        "census bfloat16 + fp32 re-scoring",
    )
    ways = {today: cloze_sweep_work(lm, 16), exact: census_work(lm, "float32", args.batch_size, [])}
    calibration = calibration_sample(dataset)
    started = time.perf_counter()
    ways[fast] = census_work(lm, "bfloat16", args.batch_size, calibration)
    calibration_seconds = time.perf_counter() - started

    def units(name: str, part: list[qloc.Fact]) -> list:
        return part if name == today else [CensusChunk(tuple(part))]

    for name, work in ways.items():
        timed(work, units(name, warm_up))
    seconds = dict.fromkeys(ways, 0.0)
    rows: dict[str, list[dict]] = {name: [] for name in ways}
    slices = range(0, len(facts), CHUNK_FACTS)
    for index, start in enumerate(slices):
        part = facts[start : start + CHUNK_FACTS]
        names = list(ways)
        for name in names[index % len(names) :] + names[: index % len(names)]:  # rotate who goes first
            elapsed, part_rows = timed(ways[name], units(name, part))
            seconds[name] += elapsed
            rows[name] += part_rows
    queries = sum(len(f.queries) for f in facts)
    print(
        f"{args.model}: {len(facts)} facts, {queries} queries (seed {args.seed}), {len(slices)} "
        f"interleaved slices, census batch size {args.batch_size}; "
        f"every usable ParaRel query: {all_queries}\n"
    )
    print("| way | s | queries/s | speed-up | projected full census |")
    print("|---|---|---|---|---|")
    for name, elapsed in seconds.items():
        rate = queries / elapsed
        print(
            f"| {name} | {elapsed:.1f} | {rate:.1f} | {seconds[today] / elapsed:.2f}x "
            f"| {all_queries / rate / 60:.0f} min |"
        )
    print(
        f"\nbfloat16 calibration (once per session, {len(calibration)} queries): {calibration_seconds:.1f} s"
    )

    frames = {
        name: pd.DataFrame(r).set_index(["fact_id", "query_index"]).sort_index() for name, r in rows.items()
    }
    print(f"\nbfloat16 vs float32 census on {queries} queries:")
    for measure, value in agreement(frames[fast], frames[exact]).items():
        print(f"- {measure}: {value:.4g}")
    census = frames[exact]
    print(
        f"- known at top-1: {(census['rank'] == 0).mean():.1%} of queries, top-10: "
        f"{(census['rank'] < 10).mean():.1%}; median rank {census['rank'].median():.0f}, "
        f"median P(o) {census['prob'].median():.2g}"
    )
    old = frames[today]
    unequal = old["rank"] != census["rank"]
    print(
        f"\nfloat32 census vs today's cloze scores: rank equal {(~unequal).mean():.2%} (where not: "
        f"{unequal.sum()} queries, ranks {census['rank'][unequal].min()} and up, |rank diff| at most "
        f"{(old['rank'] - census['rank']).abs().max()}), top-1 and top-10 membership equal "
        f"{((old['rank'] == 0) == (census['rank'] == 0)).mean():.2%} and "
        f"{((old['rank'] < 10) == (census['rank'] < 10)).mean():.2%}, "
        f"P(o) max relative diff {((old['prob'] - census['prob']).abs() / old['prob']).max():.2g}"
    )


if __name__ == "__main__":
    main()
