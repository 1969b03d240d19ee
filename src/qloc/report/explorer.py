"""The data of the report's per-fact explorer: for every fact of a run, its queries with the
model's answer probability and rank, each query's KN set per method, the fact's CS and classes,
its CAS sets, its edits, its mapping effects and, where synapses ran, its knowledge synapses and
KN activations (Figures 1 and 5 of the paper, for every fact).

Everything comes from the run store, compactly: a neuron as one index (layer x MLP width +
neuron), floats cut to 4 significant digits, no dense score tensors, so the embedded data grows
linearly with the facts. The explorer's JavaScript (``assets/explorer.js``) draws it; the
Jaccard overlap of the KN sets is computed there from the sets.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ..studies.consistency_tables import classify, fact_consistency
from ..studies.knsets import STATIC_THRESHOLD
from .format import rounded

EDIT_COLUMNS = (
    "mode",
    "kn_set",
    "kn_size",
    "new_object",
    "rel",
    "gen",
    "loc",
    "avg",
    "dppl",
    "prob_before",
    "prob_after",
    "new_prob_before",
    "new_prob_after",
    "kn_dropped",
)
"""Columns of the store's ``edits`` table shown per edit (the later ones where the store has them)."""
SYNAPSES_SHOWN = 40
"""The strongest knowledge synapses kept per query (runs can find hundreds)."""


def _pairs(text_or_list: Any) -> list[tuple[int, int]]:
    pairs = json.loads(text_or_list) if isinstance(text_or_list, str) else text_or_list
    return [(int(layer), int(neuron)) for layer, neuron in pairs]


def _indices(pairs: list[tuple[int, int]], width: int) -> list[int]:
    """Neurons as one sorted index each, ``layer * width + neuron``: a third of the bytes of
    [layer, neuron] pairs in JSON."""
    return sorted(layer * width + neuron for layer, neuron in pairs)


def _json_column(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _by_fact(frame: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    if frame is None or frame.empty:
        return {}
    return {fact_id: group for fact_id, group in frame.groupby("fact_id", sort=False)}


def _edits(group: pd.DataFrame) -> list[dict]:
    columns = [c for c in EDIT_COLUMNS if c in group.columns]
    return [
        {c: rounded(row[c]) if pd.notna(row[c]) else None for c in columns} for _, row in group.iterrows()
    ]


def _mapping(group: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Mean dProb over the fact's queries, per operation and KN set."""
    means = group.groupby(["operation", "kn_set"], sort=False)["dprob"].mean()
    table: dict[str, dict[str, float | None]] = {}
    for (operation, kn_set), value in means.items():
        table.setdefault(operation, {})[kn_set] = rounded(value)
    return table


def _synapses(found: pd.DataFrame, effects: pd.DataFrame | None) -> dict:
    """Per query: its strongest synapses (layer, head, query position, key position, score) and
    the activations of the fact's heatmap neurons with no manipulation, KS suppressed and enhanced."""
    found = found.sort_values("query_index")
    queries = []
    for _, row in found.iterrows():
        synapses = _json_column(row["synapses"])[:SYNAPSES_SHOWN]
        entry: dict[str, Any] = {
            "index": int(row["query_index"]),
            "count": int(row["n_synapses"]),
            "synapses": [[int(v) for v in s[:4]] + [rounded(s[4], 3)] for s in synapses],
            "heat": {},
            "dprob": {},
        }
        if effects is not None:
            mine = effects[effects["query_index"] == row["query_index"]]
            for _, effect in mine.iterrows():
                entry["heat"][effect["operation"]] = [rounded(v, 3) for v in _json_column(effect["heatmap"])]
                if effect["operation"] != "none":
                    entry["dprob"][effect["operation"]] = rounded(effect["dprob"])
        queries.append(entry)
    return {"neurons": [list(p) for p in _pairs(found["heatmap_neurons"].iloc[0])], "queries": queries}


def explorer_run(
    label: str, model: str, frames: dict[str, pd.DataFrame], shape: tuple[int, int] | None
) -> dict:
    """One run's explorer data. ``frames``: the store's tables by name (``kn_sets`` required;
    ``cas_sets``, ``edits``, ``mapping``, ``synapses``, ``synapse_effects`` where they exist);
    ``shape``: (layers, MLP width), else inferred from the largest KN index. KN and CAS sets are
    lists of neuron indices (``layer * width + neuron``)."""
    # Plain Python from here: per-fact pandas selections cost seconds per thousand facts.
    kn_sets = frames["kn_sets"].sort_values("query_index", kind="stable")
    kn_sets = kn_sets.assign(pairs=[_pairs(k) for k in kn_sets["kn"]])
    cas = _cas_sets(frames)
    if shape is None:
        shape = _inferred_shape([*kn_sets["pairs"], *cas.values()])
    layers, width = shape
    facts = _facts(kn_sets, width)
    _add_consistency(facts, kn_sets.assign(model=model), cas, width)
    _add_experiments(facts, frames)
    return {
        "label": label,
        "model": model,
        "methods": list(dict.fromkeys(kn_sets["method"])),
        "layers": int(layers),
        "width": int(width),
        "static_threshold": STATIC_THRESHOLD,
        "facts": list(facts.values()),
    }


def _cas_sets(frames: dict[str, pd.DataFrame]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """The CAS set of each (fact, method), where the store has CAS sets."""
    if "cas_sets" not in frames:
        return {}
    return {(r.fact_id, r.method): _pairs(r.kn) for r in frames["cas_sets"].itertuples(index=False)}


def _inferred_shape(neuron_sets: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """(layers, MLP width) as small as holds every neuron of ``neuron_sets`` (1 x 1 where they are empty)."""
    every = [p for pairs in neuron_sets for p in pairs] or [(0, 0)]
    return max(p[0] for p in every) + 1, max(p[1] for p in every) + 1


def _facts(kn_sets: pd.DataFrame, width: int) -> dict[str, dict]:
    """Each fact with its queries (prompt, probability and rank of the answer) and its KN sets per
    method, one per query; ``cs`` and ``cas`` left empty for :func:`_add_consistency`."""
    facts: dict[str, dict] = {}
    for row in kn_sets.itertuples(index=False):
        fact = facts.setdefault(
            row.fact_id,
            {
                "id": row.fact_id,
                "relation": row.relation,
                "object": row.answer,
                "queries": [],
                "kn": {},
                "cs": {},
                "cas": {},
            },
        )
        if not fact["kn"] or row.method == next(iter(fact["kn"])):  # queries as the first method lists them
            fact["queries"].append([row.prompt, rounded(row.prob), int(row.rank)])
        fact["kn"].setdefault(row.method, []).append(_indices(row.pairs, width))
    return facts


def _add_consistency(
    facts: dict[str, dict],
    kn_sets: pd.DataFrame,
    cas: dict[tuple[str, str], list[tuple[int, int]]],
    width: int,
) -> None:
    """Per fact and method: its CS (relaxed and strict), its classes and its CAS set. ``kn_sets``
    carries the run's ``model`` column, which :func:`fact_consistency` groups by."""
    classified = classify(fact_consistency(kn_sets))
    scores = {(r.fact_id, r.method): r for r in classified.itertuples(index=False)}
    for fact_id, fact in facts.items():
        for method in fact["kn"]:
            score = scores[(fact_id, method)]
            fact["cs"][method] = {
                "cs": rounded(score.cs_relaxed),
                "strict": rounded(score.cs_strict),
                "static": score.class_static,
                "otsu": score.class_otsu,
                "otsu_threshold": rounded(score.otsu_threshold),
            }
            if (fact_id, method) in cas:
                fact["cas"][method] = _indices(cas[(fact_id, method)], width)


def _add_experiments(facts: dict[str, dict], frames: dict[str, pd.DataFrame]) -> None:
    """Each fact's edits, mapping effects and knowledge synapses, where the store has them."""
    edits, mapping = _by_fact(frames.get("edits")), _by_fact(frames.get("mapping"))
    synapses, effects = _by_fact(frames.get("synapses")), _by_fact(frames.get("synapse_effects"))
    for fact_id, fact in facts.items():
        if fact_id in edits:
            fact["edits"] = {"method": edits[fact_id]["method"].iloc[0], "rows": _edits(edits[fact_id])}
        if fact_id in mapping:
            fact["mapping"] = {
                "method": mapping[fact_id]["method"].iloc[0],
                "dprob": _mapping(mapping[fact_id]),
            }
        if fact_id in synapses:
            fact["synapses"] = _synapses(synapses[fact_id], effects.get(fact_id))
