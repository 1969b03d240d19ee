"""Which of a localize run's facts a study takes: the seeded prefix, and its class-stratified form."""

import json
from pathlib import Path

import pytest

from qloc.data.pararel import Fact
from qloc.errors import ConfigError
from qloc.runs.store import RunStore
from qloc.runs.sweep import run_sweep
from qloc.studies.localize_run import LocalizedRun, check_stratification, stratified_prefix
from tests.helpers import assert_refused

FACTS = [Fact(f"P1/{i}", "P1", "P1(x)", f"s{i}", f"o{i}", ("a", "b")) for i in range(10)]
CONSISTENT = [[[0, 0], [0, 1]], [[0, 0], [0, 1]]]  # CS 1: KC under both thresholds
INCONSISTENT = [[[1, 0]], [[1, 1]]]  # CS 0: KI


def test_stratified_prefix_takes_half_of_each_class_and_extends_with_the_limit():
    classes = {f.id: "KC" if i < 3 else "KI" for i, f in enumerate(FACTS)}
    order = FACTS[::-1]  # a seeded order: KI facts first
    four = stratified_prefix(order, classes, 4)
    assert [classes[f.id] for f in four].count("KC") == 2 and len(four) == 4
    assert [f.id for f in four] == [f.id for f in order if f in four]  # in the seeded order
    # KC has 3 facts: a limit of 8 takes all of them and fills up with KI.
    assert [classes[f.id] for f in stratified_prefix(order, classes, 8)].count("KC") == 3
    assert len(stratified_prefix(order, classes, 50)) == 10
    # Every larger limit keeps the facts of the smaller: each class's prefix only grows.
    for limit in range(1, 11):
        smaller, larger = (
            stratified_prefix(order, classes, limit),
            stratified_prefix(order, classes, limit + 1),
        )
        assert set(map(id, smaller)) <= set(map(id, larger)) and len(larger) == min(limit + 1, 10)


def test_stratification_is_checked():
    check_stratification(None, None)
    check_stratification("otsu", "ig")
    with pytest.raises(ConfigError, match="stratify 'half'"):
        check_stratification("half", None)
    with pytest.raises(ConfigError, match="stratify_method 'ig' needs stratify"):
        check_stratification(None, "ig")


def _run_with_kn_sets(run_dir: Path) -> LocalizedRun:
    """A run whose amig sets make P1/0-P1/2 KC and the rest KI, and whose ig sets make all KI."""

    def kn_sets(fact, writer):
        index = int(fact.id.split("/")[1])
        rows = []
        for method, sets in (("amig", CONSISTENT if index < 3 else INCONSISTENT), ("ig", INCONSISTENT)):
            for query, kn in enumerate(sets):
                rows.append(
                    {
                        "fact_id": fact.id,
                        "relation": "P1",
                        "method": method,
                        "query_index": query,
                        "kn": json.dumps(kn),
                    }
                )
        writer.add("kn_sets", rows)

    with RunStore.open_stage(run_dir, "localize", {"model": "tiny"}) as store:
        run_sweep(store, "localize", FACTS, kn_sets, quiet=True)
    return LocalizedRun(run_dir, {}, "amig", {}, FACTS, FACTS, "cpu", "test")


def test_a_stratified_sample_of_a_run_and_the_parameters_it_records(tmp_path):
    run = _run_with_kn_sets(tmp_path / "run")
    plain = run.sample(4, seed=0)
    assert plain.facts == run.first_facts(4, 0) and plain.params == {
        "stratify": None,
        "stratify_method": None,
    }
    assert plain.note == ""
    stratified = run.sample(4, seed=0, stratify="static")
    kc = [f for f in stratified.facts if int(f.id.split("/")[1]) < 3]
    assert len(stratified.facts) == 4 and len(kc) == 2
    # The study's method classes the facts unless another is named; the resolved one is recorded.
    assert stratified.params == {"stratify": "static", "stratify_method": "amig"}
    assert stratified.note.startswith(
        "; 2 KC and 2 KI facts (static threshold, amig KN sets)"
    )  # appended to a summary
    # The studies' rows carry the stratum's class; an unstratified sample leaves each study its own.
    assert stratified.classes == {f.id: "KC" if f in kc else "KI" for f in stratified.facts}
    assert plain.classes is None
    assert run.sample(4, seed=0, stratify="otsu").params["stratify"] == "otsu"
    by_ig = run.sample(4, seed=0, stratify="static", stratify_method="ig")
    assert by_ig.facts == run.first_facts(4, 0) and "0 KC and 4 KI" in by_ig.note  # no KC to take
    assert run.sample(None, seed=0, stratify="static").facts == run.first_facts(None, 0)


def test_the_commands_refuse_a_stratification_they_cannot_use(qloc_cli, tmp_path):
    result = qloc_cli("mapping", "--run-dir", tmp_path, "--stratify", "half")
    assert_refused(result, "--stratify 'half'", "static or otsu")
    assert_refused(qloc_cli("synapses", "--run-dir", tmp_path, "--stratify-method", "ig"), "needs --stratify")
    sequential = qloc_cli("edit", "--run-dir", tmp_path, "--sequential", "2", "--stratify", "static")
    assert_refused(sequential, "--sequential", "--stratify")
