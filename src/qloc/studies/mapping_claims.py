"""What the mapping study shows: the caption of Figure 4 and its claim rule (which KN set moves the
answer most)."""

from __future__ import annotations

import math

from ..numbers import format_number
from .claims import SET_NAMES, ClaimRules, records
from .paper import no_paper_number
from .registry import Caption, Frames, Panel, count_text


def _mapping(t: Frames, panel: Panel) -> str:
    frame = t["fig4_mapping"]
    text = (
        "Relative change of the answer's probability (dProb: -1 = gone, 1 = doubled) when neurons of a query "
        "are suppressed (x0) or enhanced (x2): its own KNs (Self), the union, intersection or refined set "
        "(in two or more) of its neighbour queries' KNs, and as many unrelated neurons; "
        f"{count_text(frame, 'queries')} queries per row. Under query localization Self moves the answer "
        "most."
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


CAPTIONS: dict[str, Caption] = {"fig4_mapping": _mapping}
"""The mapping study's captions, by panel key (:data:`qloc.studies.registry.Caption`)."""


class MappingClaims(ClaimRules):
    """The mapping study's claim (Figure 4)."""

    def check(self) -> None:
        self.mapping()

    def mapping(self) -> None:
        table = self.table("fig4_mapping")
        if table is None:
            return
        column = "dprob_median" if "dprob_median" in table else "dprob"
        statistic = "median" if column == "dprob_median" else "mean"
        classes = [c for c in ("KC", "KI") if c in set(table["class"])] or ["Avg"]
        for (method, operation), rows in table.groupby(["method", "operation"], sort=False):
            direction = -1.0 if operation == "suppress" else 1.0
            for fact_class in classes:
                part = rows[rows["class"] == fact_class]
                # A set empty for every query has no statistic (NaN): there is no order to read.
                effect = {r.kn_set: float(getattr(r, column)) for r in records(part)}
                effect = {name: value for name, value in effect.items() if not math.isnan(value)}
                if not {"self", "intersection", "refine", "unrelated"} <= set(effect):
                    continue
                order = sorted(effect, key=lambda s: -direction * effect[s])
                measured = "; ".join(f"{SET_NAMES[s]} {format_number(effect[s])}" for s in order)
                self_first = direction * effect["self"] > max(
                    direction * effect[s] for s in ("intersection", "refine")
                )
                unrelated_last = order[-1] == "unrelated"
                paper = no_paper_number(self.paper.unquoted("mapping"))
                misses = [
                    text
                    for ok, text in (
                        (self_first, "Self does not beat Intersection/Refine"),
                        (unrelated_last, "Unrelated is not the weakest"),
                    )
                    if not ok
                ]
                self.add(
                    "mapping",
                    f"{method.upper()} {operation}, {fact_class}: {statistic} dProb per KN set, "
                    "strongest first",
                    measured,
                    paper,
                    "agrees" if not misses else "differs",
                    "; ".join(misses),
                )
