"""The ParaRel loader: bundled data, the causal-LM query filter counts, sampling, bad rows."""

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from qloc.data.pararel import (
    Fact,
    bundled_path,
    causal_prompt,
    interleave_relations,
    load_pararel,
    sample_facts,
)
from qloc.errors import DataError

SHARED_PARAREL = Path(__file__).resolve().parents[3] / "shared" / "data/pararel/data_all_allbags.json"


@pytest.fixture(scope="module")
def pararel():
    return load_pararel()


def test_bundled_copy_is_the_dataset():
    raw = gzip.decompress(bundled_path("pararel_allbags.json.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "ec5ec5f76d418d0559a5fa91284bc020"


def test_bundled_copy_equals_the_original_file():
    """Byte for byte against the original download where one is at hand: QLOC_PARAREL_ORIGINAL, or
    the project's shared data folder beside the repository. Elsewhere the skip says so."""
    original = Path(os.environ.get("QLOC_PARAREL_ORIGINAL", SHARED_PARAREL))
    if not original.is_file():
        pytest.skip(f"no original ParaRel file at {original} (set QLOC_PARAREL_ORIGINAL to compare)")
    raw = gzip.decompress(bundled_path("pararel_allbags.json.gz").read_bytes())
    assert raw == original.read_bytes()


def test_full_dataset_counts():
    everything = load_pararel(min_queries=0)
    assert len(everything.relations) == 34
    assert len(everything.facts) == 27738
    assert everything.total_queries == 253448
    assert not everything.warnings


@pytest.mark.parametrize(
    "query_filter, queries, facts",
    [("mask_final", 160934, 25304), ("mask_period", 150392, 24352)],
)
def test_causal_filter_counts(query_filter, queries, facts):
    """mask_period reproduces the counts the dataset's SOURCE.md gives; mask_final (METHODS.md:
    [MASK] ends the query) also keeps queries like "X, developed by [MASK]"."""
    everything = load_pararel(min_queries=0, query_filter=query_filter)
    assert sum(len(f.queries) for f in everything.facts) == queries
    usable = load_pararel(query_filter=query_filter)
    assert len(usable.facts) == facts
    assert usable.skipped["fewer than 2 usable queries"] == 27738 - facts


def test_causal_prompt_rule():
    assert causal_prompt("Allan Peiper was born in [MASK].") == "Allan Peiper was born in"
    assert causal_prompt("Allan Peiper was born in [MASK] .") == "Allan Peiper was born in"
    assert causal_prompt("MessagePad, a product of [MASK]") == "MessagePad, a product of"
    assert causal_prompt("MessagePad, a product of [MASK]", "mask_period") is None
    assert causal_prompt("[MASK] is the capital of France.") is None
    assert causal_prompt("The capital of [MASK] is Paris.") is None


def test_fact_fields(pararel):
    fact = next(f for f in pararel.facts if f.id == "P19/0")
    assert fact.subject == "Allan Peiper"
    assert fact.object == "Alexandra"
    assert fact.relation_label == "P19(place of birth)"
    assert fact.queries[0] == "Allan Peiper was born in"
    assert len(fact.queries) == 7 and fact.dropped_queries == 6


def test_sampling_is_seeded_and_ordered(pararel):
    a = sample_facts(pararel.facts, facts_per_relation=2, seed=3)
    b = sample_facts(pararel.facts, facts_per_relation=2, seed=3)
    c = sample_facts(pararel.facts, facts_per_relation=2, seed=4)
    assert [f.id for f in a] == [f.id for f in b] != [f.id for f in c]
    assert len(a) == 2 * len(pararel.relations)
    order = {f.id: i for i, f in enumerate(pararel.facts)}
    assert [order[f.id] for f in a] == sorted(order[f.id] for f in a)
    limited = sample_facts(pararel.facts, relations=["P19", "P36"], limit=5, seed=0)
    assert len(limited) == 5 and {f.relation for f in limited} <= {"P19", "P36"}


def test_unknown_relation_is_named(pararel):
    with pytest.raises(DataError, match="P9999"):
        sample_facts(pararel.facts, relations=["P19", "P9999"])


def test_malformed_rows_are_named_counted_and_skipped(tmp_path):
    good = [
        ["Paris is the capital of [MASK].", "France", "P36(capital)"],
        ["The capital of France is [MASK].", "France", "P36(capital)"],
    ]
    data = {
        "P36": [
            good,
            [["bad row"], *good],  # one malformed row, fact still usable
            "not a fact",
            [
                ["A is [MASK].", "X", "P36(capital)"],
                ["B is [MASK].", "Y", "P36(capital)"],
            ],  # answers disagree
            [["Only one [MASK].", "France", "P36(capital)"]],  # fewer than 2 queries
        ],
        "P99": 5,
    }
    path = tmp_path / "data_all_allbags.json"
    path.write_text(json.dumps(data))
    loaded = load_pararel(path)
    assert [f.id for f in loaded.facts] == ["P36/0", "P36/1"]
    assert loaded.skipped == {
        "malformed row": 1,
        "malformed fact": 2,
        "malformed relation": 1,
        "fewer than 2 usable queries": 1,
    }
    text = "\n".join(loaded.warnings)
    assert "P36/1 row 0" in text and "P36/2" in text and "P36/3" in text and "'P99'" in text


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_pararel(path)
    with pytest.raises(DataError, match="missing.json"):
        load_pararel(tmp_path / "missing.json")


def test_bundled_wikitext():
    from qloc.data.wikitext import load_wikitext_test, wikitext_passages

    raw = gzip.decompress(bundled_path("wikitext2_test.raw.gz").read_bytes())
    assert (
        hashlib.sha256(raw).hexdigest() == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    )
    text = load_wikitext_test()
    assert text.startswith(" = Robert Boulter = ") and "\r" not in text
    passages = wikitext_passages(5, seed=1)
    assert passages == wikitext_passages(5, seed=1) != wikitext_passages(5, seed=2)
    assert all(len(p) >= 1200 and p in text for p in passages)


def test_a_sweep_works_round_robin_over_relations():
    facts = [Fact(f"{r}-{i}", r, r, "s", "o", ("q", "p")) for r in ("P36", "P19", "P101") for i in range(3)]
    facts = facts[:-1]  # P101 has 2 facts
    order = [f.id for f in interleave_relations(facts)]
    assert order[:3] == ["P19-0", "P36-0", "P101-0"] and order[-1] == "P36-2"  # numeric relation order
    assert sorted(order) == sorted(f.id for f in facts)
