"""The captions of the report's panels: what each table and figure measures, how to read it, and on
how many facts or queries, by the key the study declared the panel under.

Most captions are templates: ``{facts}``, ``{queries}``, ``{seeds}`` and ``{passes}`` are the values
of those count columns in the panel's first table (``31``, or ``20-200`` where rows differ),
``{rows}`` its number of rows. The few that need more are functions of the tables and the panel."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from ..engine.attribution import DEFAULT_SYNAPSE_THRESHOLD
from ..studies.knsets import STATIC_THRESHOLD
from ..studies.registry import Panel
from .format import format_number

Frames = dict[str, pd.DataFrame]
COUNT_COLUMNS = ("facts", "queries", "seeds", "passes")
EDIT_READING = (
    "Rel: the edit works on the edited query; Gen: on the fact's other queries; Loc: 10 unrelated "
    "queries keep their answers; Avg: their mean (all 0-1, higher is better). dPPL: relative change "
    "of WikiText-2 perplexity (0 unchanged, 1 doubled); cells above 1 are marked: such an edit "
    "broke the model. An erasure's Rel and Gen are 1 on a query the model never answered right: "
    "rel_known and gen_known count only the queries it answered right (top-1) before the edit "
    "(known_queries, known_neighbours of them; empty: not stored), and prob_drop is the mean fall of "
    "the edited query's P(answer)."
)
TEMPLATES = {
    "fig9_ki_share": (
        "Share of KI facts (0-1) as the static threshold runs from 0.04 to 0.80, one curve per model and "
        "method. A curve that rises early means most facts have a low CS."
    ),
    "threshold_sensitivity": (
        "KI shares and CS_KC per KN rule (t = KNs score at least t x the top score; topN = the N best "
        "neurons) with the chance baseline: whether the KI share depends on how KN sets are cut."
    ),
    "table2": (
        "Erasing each fact's answer, or updating it to another object of the relation, through one query's "
        "KN set (Self) or the union of all its queries' sets (Union); {facts} facts per row, split into KC "
        "and KI facts. " + EDIT_READING
    ),
    "table3": (
        "Table 2 with Consistency-Aware KN selection (CAS: neurons scoring high and alike across the fact's "
        "queries); {facts} facts per row. " + EDIT_READING
    ),
    "fig5_heatmap": (
        "KN activations of one fact (columns: its KNs by layer; rows: its queries) with no manipulation, "
        "with the query's knowledge synapses suppressed, and enhanced. The fact explorer below draws this "
        "for every fact the synapse experiment ran on."
    ),
    "table6_cost": (
        "Wall time (s) and peak memory (MB; CPU: growth of resident memory, CUDA: allocated memory) of "
        "one forward pass with no, suppressed and enhanced synapses; {passes} passes."
    ),
    "table7": (
        "Sequential editing: {facts} facts updated one after another without restoring the weights, "
        "everything measured at the end; mean and std over {seeds} seeds. Rel, Gen, Loc, Avg 0-1; dPPL "
        "relative perplexity change."
    ),
    "table8": "Greedy continuations of the edited query and of a neighbour query before and after one edit.",
    "census_relations": (
        "Per relation: share of queries and of facts whose answer the model ranks first (top-1) or in its "
        "top 10: how much of ParaRel the model knows."
    ),
    "consistency": (
        "Per fact and method: CS (relaxed and strict), size of the KN union and the KC/KI classes; {rows} "
        "rows. The fact explorer shows each fact's KN sets."
    ),
}


def _count(frame: pd.DataFrame, column: str) -> str:
    """The values of a count column as text: ``31``, or ``20-200`` where rows differ."""
    if column not in frame or frame[column].dropna().empty:
        return "?"
    low, high = int(frame[column].min()), int(frame[column].max())
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def _table1(t: Frames, panel: Panel) -> str:
    frame = t["table1"]
    chance = (
        " cs_null_mean / cs_null_p95: mean and 95th percentile of CS for groups of queries drawn from "
        "different facts (chance); R_above_null: share of facts above it."
        if "cs_null_p95" in frame
        else ""
    )
    return (
        f"KN consistency over {_count(frame, 'facts')} facts per model and method. R_KI / R_KC: share of "
        "facts (0-1) that are inconsistent / consistent; CS_KI / CS_KC: their mean consistency score (share "
        "of a fact's KN union held by two or more of its queries, 0-1); t, p: Welch's t-test of KC against "
        "KI; U_KI: share of facts every method classes KI; empty_union: facts without any KN. KC means "
        f"CS >= the threshold: static {STATIC_THRESHOLD:g}, or Otsu's per run." + chance
    )


def _relations(t: Frames, panel: Panel) -> str:
    method = panel.tables[0].removeprefix("relations_")
    frame = t.get(f"relations_{method}")
    size = f" {int(frame['facts'].sum()):,} facts in {len(frame):,} relations." if frame is not None else ""
    return (
        f"CS of every fact per relation, {method.upper()} KN sets (dots: facts; red line: the static "
        f"threshold {STATIC_THRESHOLD:g}). Relations whose facts sit low are KI.{size} Columns: facts, "
        "mean and median CS, share of KI facts."
    )


def _synapse_effects(t: Frames, panel: Panel) -> str:
    name = panel.tables[0]
    frame = t[name]
    measure = "mean |activation|" if name.endswith("magnitude") else "mean activation"
    return (
        "Suppressing (x0) or enhancing (x2) each query's knowledge synapses (attention probabilities "
        f"with an IG score >= {DEFAULT_SYNAPSE_THRESHOLD:g} x the top one; "
        f"{format_number(frame['synapses_mean'].max())} per query on average): relative change of the "
        f"{measure} of the query's KNs, of neighbour queries' KNs, of random non-KNs, and of P(answer); "
        f"{_count(frame, 'queries')} queries. Means of ratios explode "
        "where a mean is near 0: read the medians. Figure 11 shows their distributions."
    )


def _mapping(t: Frames, panel: Panel) -> str:
    frame = t["fig4_mapping"]
    text = (
        "Relative change of the answer's probability (dProb: -1 = gone, 1 = doubled) when neurons of a query "
        "are suppressed (x0) or enhanced (x2): its own KNs (Self), the union, intersection or refined set "
        "(in two or more) of its neighbour queries' KNs, and as many unrelated neurons; "
        f"{_count(frame, 'queries')} queries per row. Under query localization Self moves the answer most."
    )
    if "empty_sets" not in frame:
        return text
    # Both operations act on the same sets: one operation's "Avg" rows count them, per method.
    overall = frame[(frame["class"] == "Avg") & (frame["operation"] == frame["operation"].iloc[0])]
    counts = "; ".join(
        f"{method.upper()} " + ", ".join(f"{r.kn_set.capitalize()} {int(r.empty_sets):,}" for r in empty)
        for method, rows in overall.groupby("method", sort=False)
        if (empty := list(rows[rows["empty_sets"] > 0].itertuples()))
    )
    return text + (
        " A query whose set is empty (nothing to change) is left out of that set's statistics; empty "
        f"sets: {counts} (column empty_sets)."
        if counts
        else " No set was empty."
    )


WRITERS: dict[str, Callable[[Frames, Panel], str]] = {
    "table1": _table1,
    "fig4_mapping": _mapping,
    "relations_{method}": _relations,
    "fig6_synapses": _synapse_effects,
    "fig6_synapses_magnitude": _synapse_effects,
}
"""Captions that need more than counts."""


def caption(key: str, frames: Frames, panel: Panel) -> str:
    """The caption of a panel declared under ``key``; none for a panel no study declares."""
    if key in WRITERS:
        return WRITERS[key](frames, panel)
    if key not in TEMPLATES:
        return ""
    frame = frames.get(panel.tables[0]) if panel.tables else None
    counts = {c: _count(frame, c) for c in COUNT_COLUMNS} if frame is not None else {}
    rows = f"{len(frame):,}" if frame is not None else "?"
    return TEMPLATES[key].format(rows=rows, **counts)
