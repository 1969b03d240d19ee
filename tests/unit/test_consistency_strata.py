"""The CS ablation, knowledge strata and query-count bins on hand-made KN sets."""

import pandas as pd
import pytest

from qloc.studies.consistency_strata import (
    cs_ablation,
    cs_by_queries,
    fact_cs,
    known_facts,
    table1_by_knowledge,
    two_queries,
    without_layers,
    without_shared,
)


def kn_rows(facts: dict[str, list[list[tuple[int, int]]]], ranks: dict[str, list[int]] | None = None):
    rows = []
    for fact_id, sets in facts.items():
        for method in ("ig", "amig"):
            for index, kn in enumerate(sets):
                rows.append(
                    dict(
                        model="m",
                        fact_id=fact_id,
                        relation="P1",
                        method=method,
                        query_index=index,
                        kn=[list(u) for u in kn],
                        kn_size=len(kn),
                        rank=(ranks or {}).get(fact_id, [5] * len(sets))[index],
                    )
                )
    return pd.DataFrame(rows)


A, B, C, D, LAST = (0, 1), (0, 2), (1, 3), (1, 4), (3, 9)
FACTS = {
    # in 3 of 4 sets: A; in 2: B; in 1: C, D -> relaxed 2/4, majority (3 of 4) 1/4, strict 0
    "f1": [[A, B, LAST], [A, B, LAST], [A, C, LAST], [D, LAST]],
    "f2": [[C, LAST], [D, LAST]],
    "f3": [[A, LAST], [A, LAST], [B, LAST]],
}


def test_the_count_a_kn_needs_runs_from_relaxed_to_strict():
    frame = kn_rows({"f1": [[A, B], [A, B], [A, C], [D]]})
    cs = {
        count: fact_cs(frame, count).set_index("method").loc["ig", "cs"]
        for count in ("relaxed", "majority", "strict")
    }
    assert cs == {"relaxed": 2 / 4, "majority": 1 / 4, "strict": 0.0}


def test_kn_sets_lose_the_last_layers_and_the_shared_neurons():
    frame = kn_rows(FACTS)
    assert all(LAST not in map(tuple, kn) for kn in without_layers(frame, 1, num_layers=4)["kn"])
    assert all(len(kn) for kn in without_layers(frame, 1, num_layers=5)["kn"])  # layer 3 is not the last of 5
    pruned = without_shared(frame, share=0.7)  # more than 2.1 of 3 facts: LAST only (the rest are in 2)
    kept = set().union(*(map(tuple, kn) for kn in pruned["kn"]))
    assert LAST not in kept and {A, B, C, D} <= kept


def test_two_queries_per_fact_are_the_same_for_every_method():
    picked = two_queries(kn_rows(FACTS))
    per_fact = picked.groupby(["fact_id", "method"])["query_index"].apply(frozenset)
    assert (picked.groupby(["fact_id", "method"]).size() == 2).all()
    assert per_fact.loc["f1", "ig"] == per_fact.loc["f1", "amig"]


def test_knowledge_is_two_queries_ranked_first():
    frame = kn_rows(FACTS, ranks={"f1": [0, 0, 3, 9], "f2": [0, 4], "f3": [0, 0, 0]})
    assert known_facts(frame) == {"f1", "f3"}
    by_knowledge = table1_by_knowledge(frame).set_index(["method", "knowledge"])
    assert (
        by_knowledge.loc[("ig", "known"), "facts"] == 2 and by_knowledge.loc[("ig", "unknown"), "facts"] == 1
    )


def test_the_ablation_has_every_setting_and_starts_from_the_run_itself():
    frame = kn_rows(FACTS)
    table = cs_ablation(frame, num_layers=4)
    assert list(dict.fromkeys(table["group"])) == [
        "-",
        "b",
        "c",
        "e",
        "f",
        "g",
    ]  # no all-tokens run, no dense scores
    as_run = table[table.group == "-"].set_index("method")
    relaxed = table[table.setting.str.startswith("relaxed")].set_index("method")
    assert (as_run["cs_mean"] == relaxed["cs_mean"]).all() and (as_run["facts"] == 3).all()
    strict = table[table.setting.str.contains("strict")].set_index("method")
    assert strict.loc["ig", "cs_mean"] == pytest.approx(
        (1 / 5 + 1 / 3 + 1 / 3) / 3
    )  # LAST alone is in every set
    with_tokens = cs_ablation(frame, 4, all_tokens=kn_rows({"f2": FACTS["f2"]}))
    first = with_tokens[with_tokens.setting.str.startswith("first answer token")]
    assert set(first["facts"]) == {1}  # compared on the all-tokens run's facts only


def test_cs_by_queries_bins_facts_by_their_query_count():
    table = cs_by_queries(kn_rows(FACTS)).set_index(["method", "queries"])
    assert table.loc[("ig", "2"), "facts"] == 1 and table.loc[("ig", "3-4"), "facts"] == 2
    assert (
        table.loc[("ig", "2"), "cs_relaxed"] == table.loc[("ig", "2"), "cs_strict"]
    )  # the same with 2 queries
