"""The census (what a model knows) and the --known filter: scores against plain forward passes,
length bucketing, resume, the filter's choice of facts and queries, and the query an edit edits."""

import pandas as pd
import pytest
import torch

from qloc.cli import parse_known
from qloc.engine.cloze import FirstTokenScorer
from qloc.errors import QlocError
from qloc.runs.store import RunStore
from qloc.runs.sweep import run_sweep
from qloc.studies.census import (
    STAGE,
    census_chunks,
    census_table,
    census_work,
)
from qloc.studies.known import keep_known
from tests.helpers import RELATIONS, make_tiny_model, token_ids


def plain_first_token(lm, prompt: str, answer: str) -> tuple[int, float]:
    """Rank and probability of the answer's first token: one unbatched fp32 forward pass over
    the prompt, every position through the head."""
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    answer_token = lm.tokenizer(" " + answer, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
    return int((logprobs > logprobs[answer_token]).sum()), float(logprobs[answer_token].exp())


def census_rows(lm, facts, chunk_facts=256, batch_size=128) -> pd.DataFrame:
    from qloc.runs.rows import UnitWriter

    work, writer = census_work(lm, "float32", batch_size, []), UnitWriter()
    for chunk in census_chunks(facts, chunk_facts):
        work(chunk, writer)
    return pd.DataFrame(writer.rows[STAGE])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_census_equals_plain_forward_passes(word_tokenizer, tiny_facts, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    rows = census_rows(lm, tiny_facts)
    assert len(rows) == sum(len(f.queries) for f in tiny_facts)
    assert rows["prompt"].nunique() > 1 and rows["prompt"].map(lambda p: len(p.split())).nunique() > 1
    for row in rows.itertuples():
        rank, prob = plain_first_token(lm, row.prompt, row.answer)
        assert row.rank == rank
        assert row.prob == pytest.approx(prob, rel=1e-5)
        assert row.scored_in == "float32"
    facts = {f.id: f for f in tiny_facts}
    assert all(facts[r.fact_id].queries[r.query_index] == r.prompt for r in rows.itertuples())


def test_length_buckets_and_batch_size_change_nothing(word_tokenizer, tiny_facts):
    lm = make_tiny_model("llama", word_tokenizer)
    prompts, answers = token_ids(lm, [(q, f.object) for f in tiny_facts for q in f.queries])
    bucketed = FirstTokenScorer(lm, batch_size=64).score(prompts, answers)
    one_by_one = FirstTokenScorer(lm, batch_size=1).score(prompts, answers)
    assert len({len(p) for p in prompts}) > 2  # several buckets, returned in input order
    assert [s.rank for s in bucketed] == [s.rank for s in one_by_one]
    assert [s.top_token for s in bucketed] == [s.top_token for s in one_by_one]
    assert [s.prob for s in bucketed] == pytest.approx([s.prob for s in one_by_one], rel=1e-5)


def test_interrupted_census_resumes_to_the_same_table(tmp_path, word_tokenizer, tiny_facts):
    lm = make_tiny_model("llama", word_tokenizer)
    chunks = census_chunks(tiny_facts, chunk_facts=2)
    first, second = tiny_facts[0].id.split("/")[1], tiny_facts[1].id.split("/")[1]
    assert len(chunks) == 6 and chunks[0].id == f"{tiny_facts[0].relation}/{first}-{second}"
    work = census_work(lm, "float32", 16, [])
    finished = []

    def dies_after_two_chunks(chunk, writer):
        if len(finished) == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C mid-sweep
        work(chunk, writer)
        finished.append(chunk.id)

    params = {"model": "tiny", "relations": ",".join(RELATIONS)}
    with RunStore.open_stage(tmp_path / "killed", STAGE, params) as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(store, STAGE, chunks, dies_after_two_chunks, quiet=True)
        assert store.finished_units(STAGE) == set(finished)
        resumed = run_sweep(store, STAGE, chunks, work, quiet=True)
        killed = store.frame(STAGE)
    with RunStore.open_stage(tmp_path / "clean", STAGE, params) as store:
        run_sweep(store, STAGE, chunks, work, quiet=True)
        clean = store.frame(STAGE)
    assert (resumed.resumed, resumed.done) == (2, 4)
    columns = ["fact_id", "query_index", "prompt", "answer_token", "rank", "prob", "top_token"]
    order = ["fact_id", "query_index"]
    assert (
        killed[columns]
        .sort_values(order)
        .reset_index(drop=True)
        .equals(clean[columns].sort_values(order).reset_index(drop=True))
    )


def test_known_keeps_exactly_the_facts_with_two_queries_below_k(word_tokenizer, tiny_facts):
    lm = make_tiny_model("llama", word_tokenizer)
    rows = census_rows(lm, tiny_facts)
    k = int(rows["rank"].median())
    kept = keep_known(tiny_facts, rows, k)
    # The expectation, from the census rows alone.
    below = rows[rows["rank"] < k].sort_values(["fact_id", "query_index"])
    expected = {fid: tuple(g["prompt"]) for fid, g in below.groupby("fact_id") if len(g) >= 2}
    assert 0 < len(expected) < len(tiny_facts)
    assert {f.id: f.queries for f in kept} == expected
    assert [f.id for f in kept] == [f.id for f in tiny_facts if f.id in expected]  # dataset order
    assert keep_known(tiny_facts, rows, 10**6) == list(tiny_facts)  # every rank is below 10**6


def test_census_table_counts(word_tokenizer, tiny_facts):
    rows = census_rows(make_tiny_model("llama", word_tokenizer), tiny_facts)
    first = rows["fact_id"].iloc[0]
    rows.loc[rows["fact_id"] == first, "rank"] = 0  # every query of the first fact: known at top-1
    table = census_table(rows).set_index("relation")
    assert list(table.index) == ["P19", "P36", "P103", "all"]
    relation = first.split("/")[0]
    assert table.loc[relation, "facts"] == 4 and table.loc["all", "queries"] == len(rows)
    share = (rows["fact_id"] == first).sum() / (rows["relation"] == relation).sum()
    assert table.loc[relation, "queries_top1"] == pytest.approx(share)
    assert table.loc[relation, "queries_top10"] == pytest.approx(share)
    assert table.loc[relation, "facts_top1"] == pytest.approx(0.25)
    assert table.loc["all", "facts_top1"] == pytest.approx(1 / len(tiny_facts))
    assert table.loc["all", "median_rank"] == rows["rank"].median()


def test_parse_known():
    assert parse_known("all") is None and parse_known("ALL") is None
    assert parse_known("1") == 1 and parse_known(10) == 10
    for bad in ("0", "-3", "top1", "1.5"):
        with pytest.raises(QlocError, match="--known"):
            parse_known(bad)


def test_known_beyond_exact_ranks_needs_a_float32_census(tiny_facts):
    fact = tiny_facts[0]
    rows = pd.DataFrame(
        [
            {"fact_id": fact.id, "query_index": i, "prompt": q, "rank": 30, "scored_in": "bfloat16"}
            for i, q in enumerate(fact.queries)
        ]
    )
    assert keep_known(tiny_facts[:1], rows, 10) == []
    with pytest.raises(QlocError, match="--known 11.*float32"):
        keep_known(tiny_facts[:1], rows, 11)
