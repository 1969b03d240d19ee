"""KN editing: restore is bit-exact, one neuron touches one value vector, updates move the answer."""

import qloc
from tests.helpers import localize_tiny


def test_cli_edit_study_tables(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    import pandas as pd

    run = tmp_path / "run"
    base = [sys.executable, "-m", "qloc.cli"]
    localize_tiny(tiny_model_dir, run, "--relations", "P19,P36,P101", "--methods", "amig")
    few_facts = ["--shared-min-facts", "2"]  # the tiny run's handful of facts count shares, as in a large run
    # --limit 2 edits a seeded prefix of the run's facts; the run without it then extends that stage.
    first = subprocess.run(
        base + ["edit", "--run-dir", str(run), "--limit", "2", "--device", "cpu", "--quiet"] + few_facts,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        assert store.frame("edits")["fact_id"].nunique() == 2
    for mode, options in (
        ("erase", few_facts),
        ("update", ["--shared-filter", "off", "--edit-sign", "none"]),
    ):
        result = subprocess.run(
            base + ["edit", "--run-dir", str(run), "--mode", mode, "--device", "cpu", "--quiet"] + options,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        edits = store.frame("edits")
        params = store.params("edit-update-amig")
    assert params["shared_filter"] is None and params["edit_sign"] == "none"
    assert len(edits) == 2 * 3 * 3 and set(edits["kn_set"]) == {"self", "union", "cas"}
    assert edits[edits["mode"] == "update"]["new_object"].notna().all()
    # The tiny model's 192 neurons are shared by every fact: the default filter empties some sets,
    # which are recorded but not edited; with the filter off every set is edited.
    erase = edits[edits["mode"] == "erase"]
    assert (erase["kn_dropped"] > 0).any() and (erase[erase["kn_size"] == 0]["rel"].isna()).all()
    update = edits[edits["mode"] == "update"]
    assert (update["kn_dropped"] == 0).all() and (update["kn_size"] > 0).all()
    edited = edits[edits["kn_size"] > 0]
    assert ((edited["rel"] >= 0) & (edited["rel"] <= 1) & (edited["loc"] >= 0) & (edited["loc"] <= 1)).all()
    assert edited["prob_before"].between(0, 1).all() and edited["prob_after"].between(0, 1).all()
    assert update["new_prob_after"].notna().all() and erase["new_prob_after"].isna().all()
    assert (edited["neighbours_moved"] <= edited["neighbours"]).all()
    table3 = pd.read_csv(run / "tables" / "table3.csv")
    assert set(table3["mode"]) == {"erase", "update"} and set(table3["kn_set"]) == {"self", "union", "cas"}
    assert set(pd.read_csv(run / "tables" / "table2.csv")["kn_set"]) == {"self", "union"}
    assert (
        table3["facts"].sum() == 2 * 3 * 3
        and (table3["dppl_median"] <= table3["dppl"].abs().max() + 1e-12).all()
    )
    assert table3["empty_sets"].sum() == int((edits["kn_size"] == 0).sum())
    assert (
        table3["kn_dropped_total"].sum() == erase["kn_dropped"].sum()
        and table3["emptied_by_filter"].sum() > 0
    )
    assert {"catastrophic", "moved_right", "prob_before_median", "prob_after_median", "kn_dropped"} <= set(
        table3
    )
    # Which queries the model knew before each edit is stored, and erasure is reported over them.
    assert (
        edited["query_known"].isin([0, 1]).all()
        and (edited["neighbours_known"] <= edited["neighbours"]).all()
    )
    assert {"rel_known", "known_queries", "gen_known", "known_neighbours", "prob_drop"} <= set(table3)
    assert table3["known_queries"].sum() == edited["query_known"].sum()
    # Every edit keeps the footprint of what it touched (the activity filter's measure), the
    # largest of its neurons' at most their sum.
    assert (edited["footprint_max"] > 0).all() and (
        edited["footprint_max"] <= edited["footprint_sum"] + 1e-9
    ).all()
    assert edits[edits["kn_size"] == 0]["footprint_max"].isna().all()


def test_edit_counts_shared_neurons_over_a_reference_run(tmp_path, tiny_model_dir, qloc_cli):
    """``--shared-reference`` counts the filter's shares over another localize run of the model,
    recorded in the stage's parameters; a run whose KN sets were cut otherwise is refused by name."""
    from tests.helpers import assert_refused

    run, reference, other = tmp_path / "run", tmp_path / "reference", tmp_path / "other"
    localize_tiny(tiny_model_dir, run, "--relations", "P19")
    localize_tiny(tiny_model_dir, reference, "--relations", "P19,P36,P101")
    localize_tiny(tiny_model_dir, other, "--relations", "P19", "--steps", "4")
    edit = (
        "edit",
        "--run-dir",
        run,
        "--sets",
        "self",
        "--device",
        "cpu",
        "--quiet",
        "--shared-min-facts",
        "2",
    )
    refused = qloc_cli(*edit, "--shared-reference", other)
    assert_refused(refused, "--shared-reference", "steps: 4 there, 3 here")
    done = qloc_cli(*edit, "--shared-reference", reference)
    assert done.code == 0, done.err[-2000:]
    assert f"facts of reference run {str(reference)!r}" in done.out
    with qloc.RunStore.open_existing(run) as store:
        assert store.params("edit-erase-ig")["shared_reference"] == str(reference.resolve())
