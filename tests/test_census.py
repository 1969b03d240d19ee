"""The census (what a model knows) and the --known filter: scores against plain forward passes,
length bucketing, resume, the filter's choice of facts and queries, and the query an edit edits."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

import qloc
from conftest import make_tiny_model
from qloc.errors import QlocError
from qloc.runs.store import RunStore
from qloc.runs.sweep import run_sweep
from qloc.studies.census import (
    STAGE,
    FirstTokenScorer,
    calibration_sample,
    census_chunks,
    census_table,
    census_work,
    keep_known,
    parse_known,
    read_census,
)

RELATIONS = ["P19", "P36", "P103"]


def plain_first_token(lm, prompt: str, answer: str) -> tuple[int, float]:
    """Rank and probability of the answer's first token: one unbatched fp32 forward pass over
    the prompt, every position through the head."""
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    answer_token = lm.tokenizer(" " + answer, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
    return int((logprobs > logprobs[answer_token]).sum()), float(logprobs[answer_token].exp())


def token_ids(lm, pairs) -> tuple[list[list[int]], list[int]]:
    """Prompt ids (special tokens included) and answer token 0 of (prompt, answer) pairs."""
    prompts = [lm.tokenizer(p).input_ids for p, _ in pairs]
    return prompts, [lm.tokenizer(" " + a, add_special_tokens=False).input_ids[0] for _, a in pairs]


@pytest.fixture(scope="module")
def tiny_facts():
    return qloc.sample_facts(qloc.load_pararel().facts, RELATIONS, 4, seed=0)


def census_rows(lm, facts, chunk_facts=256, batch_size=128) -> pd.DataFrame:
    from qloc.runs.store import UnitWriter

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


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qloc.cli", *map(str, args)], capture_output=True, text=True, timeout=900
    )


def test_cli_census_then_known_localize_then_edit_a_known_query(tmp_path, tiny_model_dir, monkeypatch):
    census_dir, run = tmp_path / "census", tmp_path / "run"
    common = ["--model", tiny_model_dir, "--relations", "P19,P36", "--device", "cpu", "--quiet"]
    result = cli("census", "--run-dir", census_dir, *common, "--facts-per-relation", "6", "--batch-size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    with RunStore.open_existing(census_dir) as store:
        rows = store.frame(STAGE)
        assert store.params(STAGE)["precision"] == "auto" and set(rows["scored_in"]) == {"float32"}
    table = pd.read_csv(census_dir / "tables" / "census_relations.csv")
    assert list(table["relation"]) == ["P19", "P36", "all"] and table["queries"].iloc[-1] == len(rows)
    assert (census_dir / "figures" / "census_relations.svg").exists() and "queries/s" in result.stdout

    # --known K from that census: the facts and queries are exactly those with rank < K.
    k = int(rows["rank"].median())
    facts = {f.id: f for f in qloc.load_pararel().facts}
    below = rows[rows["rank"] < k].sort_values(["fact_id", "query_index"])
    expected = {fid: list(g["prompt"]) for fid, g in below.groupby("fact_id") if len(g) >= 2}
    assert 0 < len(expected) < rows["fact_id"].nunique()
    result = cli(
        "localize",
        "--run-dir",
        run,
        *common,
        "--methods",
        "ig",
        "--steps",
        "2",
        "--known",
        k,
        "--census",
        census_dir,
        "--known-pool",
        "6",
        "--facts-per-relation",
        "6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kept = f"{len(expected)} of {rows['fact_id'].nunique()} facts have >= 2 queries ranked below {k}"
    assert kept in result.stderr
    with RunStore.open_existing(run) as store:
        kn_sets = store.frame("kn_sets").sort_values(["fact_id", "query_index"])
        params = store.params("localize")
        assert STAGE not in store.tables()  # the census was read from --census, not redone
    assert params["known"] == k and params["known_pool"] == 6
    assert {fid: list(g["prompt"]) for fid, g in kn_sets.groupby("fact_id")} == expected
    # Known facts lose their unknown queries too.
    assert any(len(queries) < len(facts[fid].queries) for fid, queries in expected.items())

    # The experiments rebuild each fact from the run's queries: the edited query (Self, query 0)
    # is the first known query, and Gen measures the other known queries.
    from qloc import cli as qloc_cli
    from qloc.studies import editing as edit_study
    from qloc.studies.editing import EditConfig, edit_work

    localized = qloc_cli._localized_run(run, None, "cpu", quiet=True)
    assert {f.id: list(f.queries) for f in localized.facts} == expected
    measured = []
    real_score = edit_study.score_cloze

    def recording(lm, prompts, answers, batch_size=16):
        measured.append(list(prompts))
        return real_score(lm, prompts, answers, batch_size)

    monkeypatch.setattr(edit_study, "score_cloze", recording)
    lm = localized.model.load()
    work = edit_work(
        lm,
        EditConfig(sets=("self",), unrelated_queries=2, ppl_passages=1, ppl_tokens=16),
        localized.knowledge,
        localized.dataset,
        passages=["Paris is the capital of France ."],
    )
    from qloc.runs.store import UnitWriter

    fact = localized.facts[0]
    work(fact, UnitWriter())
    edited = measured[-1][: len(fact.queries)]  # the query, then its neighbours, then unrelated queries
    assert edited == expected[fact.id]
    assert rows.set_index(["fact_id", "prompt"]).loc[(fact.id, edited[0]), "rank"] < k


def test_known_refusals(tmp_path, tiny_model_dir, tiny_facts):
    params = {"model": "other", "data": "bundled", "query_filter": "mask_final"}
    RunStore.open_stage(tmp_path / "c", STAGE, params).close()
    with pytest.raises(QlocError, match=r"model 'other'; this run uses 'tiny'"):
        read_census(tmp_path / "c", tiny_facts, {**params, "model": "tiny"})
    with pytest.raises(QlocError, match=r"has not scored 12 of the 12 facts.*--relations P103,P19,P36"):
        read_census(tmp_path / "c", tiny_facts, params)
    result = cli("localize", "--run-dir", tmp_path / "run", "--model", tiny_model_dir, "--known", "0")
    assert result.returncode == 2 and "--known '0'" in result.stderr
    result = cli("localize", "--run-dir", tmp_path / "run", "--model", tiny_model_dir, "--known-pool", "5")
    assert result.returncode == 2 and "give --known K" in result.stderr


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


@pytest.mark.real_model
def test_bfloat16_census_keeps_top1_and_top10_membership(smollm2):
    facts = qloc.sample_facts(qloc.load_pararel().facts, ["P36", "P103", "P1412", "P19"], 6, seed=3)
    pairs = [(q, f.object) for f in facts for q in f.queries]
    prompts, answers = token_ids(smollm2, pairs)
    others = qloc.sample_facts(qloc.load_pararel().facts, None, 1, seed=9)
    calibration = list(zip(*token_ids(smollm2, calibration_sample(others, 64))))
    exact = FirstTokenScorer(smollm2, "float32").score(prompts, answers)
    fast = FirstTokenScorer(smollm2, "bfloat16", calibration=calibration).score(prompts, answers)
    assert sum(s.rank < 10 for s in exact) >= 5  # the comparison covers known queries
    assert [s.rank == 0 for s in fast] == [s.rank == 0 for s in exact]
    assert [s.rank < 10 for s in fast] == [s.rank < 10 for s in exact]
    for f, e in zip(fast, exact):
        if f.rank < 10 or e.rank < 10:
            assert f.scored_in == "float32" and f.rank == e.rank and f.prob == pytest.approx(e.prob, rel=1e-5)
