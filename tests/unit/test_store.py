"""The run store: per-fact transactions, resume, refusal of other parameters, and a real kill."""

import json

import pytest
import torch

from qloc.data.pararel import Fact
from qloc.errors import QlocError, RunDirectoryError
from qloc.runs.store import RunStore
from qloc.runs.sweep import SkipFact, run_sweep

PARAMS = {"model": "tiny", "seed": 0, "limit": 3}


FACTS = [
    Fact(
        id=f"P1/{i}",
        relation="P1",
        relation_label="P1(x)",
        subject=f"s{i}",
        object=f"o{i}",
        queries=("a", "b"),
    )
    for i in range(5)
]


def write_rows(fact, writer):
    if fact.id == "P1/3":
        raise SkipFact("answer not tokenizable", f"fact {fact.id}: answer 'o3'")
    writer.add(
        "scores",
        [
            {"fact_id": fact.id, "query": q, "value": float(i), "tokens": [1, 2]}
            for i, q in enumerate(fact.queries)
        ],
    )


def test_sweep_stores_resumes_and_counts_skips(tmp_path):
    with RunStore.open_stage(tmp_path / "run", "demo", PARAMS) as store:
        first = run_sweep(store, "demo", FACTS[:3], write_rows, quiet=True)
    assert (first.done, first.skipped, first.resumed) == (3, 0, 0)
    with RunStore.open_stage(tmp_path / "run", "demo", PARAMS) as store:
        second = run_sweep(store, "demo", FACTS, write_rows, quiet=True)
        frame = store.frame("scores")
        units = store.units("demo")
    assert (second.done, second.skipped, second.resumed) == (1, 1, 3)
    assert second.skip_reasons == {"answer not tokenizable": 1}
    assert len(frame) == 8 and frame["fact_id"].nunique() == 4
    assert frame["tokens"].iloc[0] == "[1, 2]" and frame["value"].dtype.kind == "f"
    assert units.set_index("unit_id").loc["P1/3", "status"] == "skipped"
    assert "answer 'o3'" in units.set_index("unit_id").loc["P1/3", "reason"]
    stored = json.loads((tmp_path / "run" / "params.json").read_text())
    assert stored == {"demo": PARAMS}
    assert "torch" in json.loads((tmp_path / "run" / "environment.json").read_text())["demo"]["versions"]


def test_failed_unit_writes_nothing(tmp_path):
    def fails_after_adding(fact, writer):
        writer.add("scores", {"fact_id": fact.id})
        raise RuntimeError("crash mid-fact")

    with RunStore.open_stage(tmp_path, "demo", PARAMS) as store:
        run_sweep(store, "demo", FACTS[:1], write_rows, quiet=True)
        with pytest.raises(RuntimeError):
            run_sweep(store, "demo", FACTS[1:2], fails_after_adding, quiet=True)
        assert store.finished_units("demo") == {"P1/0"}
        assert len(store.frame("scores")) == 2


def test_a_column_added_later_reads_as_not_stored_in_older_rows(tmp_path):
    with RunStore.open_stage(tmp_path, "demo", PARAMS) as store:
        run_sweep(store, "demo", FACTS[:1], write_rows, quiet=True)

    def with_evidence(fact, writer):
        writer.add("scores", {"fact_id": fact.id, "query": "a", "value": 1.0, "tokens": [], "known": 1.0})

    with RunStore.open_stage(tmp_path, "demo", PARAMS) as store:
        run_sweep(store, "demo", FACTS[:2], with_evidence, quiet=True)
        frame = store.frame("scores")
    assert frame[frame.fact_id == "P1/0"]["known"].isna().all()
    assert frame[frame.fact_id == "P1/1"]["known"].tolist() == [1.0]


def test_other_parameters_are_refused_by_name(tmp_path):
    RunStore.open_stage(tmp_path, "demo", PARAMS).close()
    with pytest.raises(RunDirectoryError, match=r"model: stored 'tiny', given 'other'"):
        RunStore.open_stage(tmp_path, "demo", {**PARAMS, "model": "other"})
    with pytest.raises(RunDirectoryError, match=r"extra: stored None, given 1"):
        RunStore.open_stage(tmp_path, "demo", {**PARAMS, "extra": 1})
    # Another stage in the same run directory has its own parameters.
    RunStore.open_stage(tmp_path, "other-stage", {"x": 1}).close()
    assert set(json.loads((tmp_path / "params.json").read_text())) == {"demo", "other-stage"}


def test_foreign_directories_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("my thesis")
    with pytest.raises(RunDirectoryError, match="not a qloc run directory"):
        RunStore.open_stage(tmp_path, "demo", PARAMS)
    with pytest.raises(RunDirectoryError, match="no qloc.sqlite"):
        RunStore.open_existing(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "my thesis"


def test_out_of_memory_names_the_fact_and_keeps_finished_ones(tmp_path):
    def runs_out_on_the_third(fact, writer):
        if fact.id == "P1/2":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        write_rows(fact, writer)

    with RunStore.open_stage(tmp_path, "demo", PARAMS) as store:
        with pytest.raises(
            QlocError,
            match=r"out of memory on fact P1/2 \('s2' -> 'o2'\).*2 units finished.*--max-batch-rows",
        ):
            run_sweep(store, "demo", FACTS, runs_out_on_the_third, quiet=True)
        assert store.finished_units("demo") == {"P1/0", "P1/1"}
