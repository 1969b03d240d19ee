"""The census (what a model knows) and the --known filter: scores against plain forward passes,
length bucketing, resume, the filter's choice of facts and queries, and the query an edit edits."""

import subprocess
import sys

import pandas as pd
import pytest

import qloc
from qloc.errors import QlocError
from qloc.runs.store import RunStore
from qloc.studies.census import (
    STAGE,
)
from qloc.studies.known import read_census


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
    from qloc.studies import edit_measures as edit_study
    from qloc.studies.edit_measures import EditConfig
    from qloc.studies.editing import EditWorkBuilder
    from qloc.studies.localize_run import read_localized_run

    localized = read_localized_run(run, None, "cpu")
    assert {f.id: list(f.queries) for f in localized.facts} == expected
    measured = []
    real_score = edit_study.score_cloze

    def recording(lm, prompts, answers, batch_size=16):
        measured.append(list(prompts))
        return real_score(lm, prompts, answers, batch_size)

    monkeypatch.setattr(edit_study, "score_cloze", recording)
    lm = localized.model.load()
    work = EditWorkBuilder(
        EditConfig(sets=("self",), unrelated_queries=2, ppl_passages=1, ppl_tokens=16),
        localized.knowledge,
        localized.shared_filter(0.1),
        localized.dataset,
        passages=["Paris is the capital of France ."],
    )(lm)
    from qloc.runs.rows import UnitWriter

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
