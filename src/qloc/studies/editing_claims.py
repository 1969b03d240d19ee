"""What the editing study shows: the captions of Tables 2, 3, 7 and 8, and its claim rules (Tables
2 and 3: Self against Union, the perplexity change, CAS)."""

from __future__ import annotations

import math

import pandas as pd

from ..numbers import format_number, format_share
from .claims import SET_NAMES, ClaimRules, records, weighted
from .edit_measures import CATASTROPHIC_DPPL
from .registry import Caption

EDIT_READING = (
    "Rel: the edit works on the edited query; Gen: on the fact's other queries; Loc: 10 unrelated "
    "queries keep their answers; Avg: their mean (all 0-1, higher is better). dPPL: relative change "
    "of WikiText-2 perplexity (0 unchanged, 1 doubled); cells above 1 are marked: such an edit "
    "broke the model. An erasure's Rel and Gen are 1 on a query the model never answered right: "
    "rel_known and gen_known count only the queries it answered right (top-1) before the edit "
    "(known_queries, known_neighbours of them; empty: not stored), and prob_drop is the mean fall of "
    "the edited query's P(answer)."
)
CAPTIONS: dict[str, Caption] = {
    "table2": (
        "Erasing each fact's answer, or updating it to another object of the relation, through one query's "
        "KN set (Self) or the union of all its queries' sets (Union); {facts} facts per row, split into KC "
        "and KI facts. " + EDIT_READING
    ),
    "table3": (
        "Table 2 with Consistency-Aware KN selection (CAS: neurons scoring high and alike across the fact's "
        "queries); {facts} facts per row. " + EDIT_READING
    ),
    "table7": (
        "Sequential editing: {facts} facts updated one after another without restoring the weights, "
        "everything measured at the end; mean and std over {seeds} seeds. Rel, Gen, Loc, Avg 0-1; dPPL "
        "relative perplexity change."
    ),
    "table8": "Greedy continuations of the edited query and of a neighbour query before and after one edit.",
}
"""The editing study's captions, by panel key (:data:`qloc.studies.registry.Caption`)."""

SELF_REACH = 0.5
"""Table 2's contrast: Self's Gen under this share of Union's is "Self does not reach the other
queries" (the paper's KI rows: 0.10-0.24; its KC rows: 0.62-0.86)."""


def _dppl_summary(
    edits: pd.DataFrame | None, part: pd.DataFrame, method: str, mode: str, kn_set: str
) -> tuple[float, int, float] | None:
    """The median dPPL of one method's edits through one KN set, over how many edits, and the share
    of them above :data:`CATASTROPHIC_DPPL`: from the stored edits where the store has them, else
    from the table's rows (``part``); None where neither has dPPL."""
    if edits is not None and {"mode", "kn_set", "dppl"} <= set(edits.columns):
        chosen = edits[(edits["method"] == method) & (edits["mode"] == mode) & (edits["kn_set"] == kn_set)][
            "dppl"
        ].dropna()
        return chosen.median(), len(chosen), (chosen > CATASTROPHIC_DPPL).mean()
    if "dppl_median" in part:
        return part["dppl_median"].median(), int(part["facts"].sum()), weighted(part, "catastrophic")
    return None


class EditingClaims(ClaimRules):
    """The editing study's claims (Tables 2 and 3)."""

    def check(self) -> None:
        self.generalisation()
        self.perplexity()
        self.cas()

    def _gen(self, rows: pd.DataFrame, fact_class: str, kn_set: str, column: str = "gen") -> float | None:
        picked = rows[(rows["class"] == fact_class) & (rows["kn_set"] == kn_set)]
        if not len(picked) or column not in picked:
            return None
        value = float(picked[column].iloc[0])
        return None if math.isnan(value) else value

    def generalisation(self) -> None:
        """Table 2's contrast: for KI facts, Self's KNs (one query's) reach the fact's other queries
        far less than Union's (the paper: Self's Gen is 10-24 % of Union's on its three models),
        for KC facts about as well (62-86 %). Self reaching under half of Union's Gen counts as
        "far less"; the share of paraphrases whose P(o) moved is given beside, a Gen that a query
        the model never answered right can still fail."""
        table2 = self.table("table2")
        if table2 is None:
            return
        for (method, mode), rows in table2.groupby(["method", "mode"], sort=False):
            ratios = {}
            for fact_class in ("KC", "KI"):
                self_gen, union_gen = (
                    self._gen(rows, fact_class, "self"),
                    self._gen(rows, fact_class, "union"),
                )
                if self_gen is not None and union_gen:
                    ratios[fact_class] = (self_gen, union_gen, self_gen / union_gen)
            for fact_class, (self_gen, union_gen, ratio) in ratios.items():
                moved = [self._gen(rows, fact_class, s, "gen_moved") for s in ("self", "union")]
                notes = [f"Self's Gen is {format_number(ratio)} of Union's"]
                if None not in moved:
                    notes.append(
                        f"paraphrases moved: Self {format_number(moved[0])}, Union {format_number(moved[1])}"
                    )
                if fact_class == "KI":
                    verdict = "agrees" if ratio < SELF_REACH else "differs"
                    notes.insert(
                        0,
                        "Self reaches far less than Union"
                        if verdict == "agrees"
                        else "Self generalises about as well as Union",
                    )
                elif "KI" in ratios:
                    verdict = "agrees" if ratio >= SELF_REACH > ratios["KI"][2] else "differs"
                    notes.insert(0, f"KI: {format_number(ratios['KI'][2])} of Union's")
                else:
                    verdict, notes = "open", ["no KI facts to compare with"]
                self.add(
                    "self_union_generalisation",
                    f"{method.upper()} {mode}, {fact_class} facts: Gen through Self vs Union",
                    f"Self {format_number(self_gen)} / Union {format_number(union_gen)}",
                    self.paper.quote_each(
                        "table2",
                        "gen",
                        self.reference,
                        {
                            SET_NAMES[s]: {"mode": mode, "class": fact_class, "kn_set": s}
                            for s in ("self", "union")
                        },
                    ),
                    verdict,
                    "; ".join(notes),
                )

    def perplexity(self) -> None:
        table2 = self.table("table2")
        if table2 is None:
            return
        edits = self.evidence.edits
        broken: dict[str, list[str]] = {}
        sets_by_mode = self.table("table3")
        if sets_by_mode is None:
            sets_by_mode = table2
        for (method, mode), rows in sets_by_mode.groupby(["method", "mode"], sort=False):
            for kn_set in dict.fromkeys(rows["kn_set"]):
                part = rows[rows["kn_set"] == kn_set]
                summary = _dppl_summary(edits, part, method, mode, kn_set)
                if summary is None:
                    continue
                median, count, catastrophic = summary
                name = SET_NAMES.get(kn_set, kn_set)
                paper = self.paper.quote_each(
                    "table3",
                    "dppl",
                    self.reference,
                    {
                        fact_class: {"mode": mode, "class": fact_class, "kn_set": kn_set}
                        for fact_class in ("KC", "KI")
                    },
                )
                notes = (
                    []
                    if math.isnan(catastrophic)
                    else [f"{format_share(catastrophic, count)} of edits above 1"]
                )
                moved = weighted(part, "moved_right")
                if not math.isnan(moved):
                    notes.append(f"{format_share(moved)} moved P(answer) the intended way")
                if median > CATASTROPHIC_DPPL:
                    broken.setdefault(f"{method.upper()} {mode}", []).append(
                        f"{name} x{format_number(1 + median)}"
                    )
                    verdict = "broken"
                else:
                    verdict = "open"
                self.add(
                    "dppl",
                    f"{method.upper()} {mode}: median dPPL through {name}",
                    format_number(median),
                    paper,
                    verdict,
                    "; ".join(notes),
                )
        for edit, sets in broken.items():
            self.warnings.append(
                f"{edit}: the median edit multiplies WikiText perplexity ({', '.join(sets)}). "
                "These edits break the model, so their Rel, Gen and Loc describe a broken model, "
                "not a precise edit."
            )

    def cas(self) -> None:
        table3 = self.table("table3")
        if table3 is None:
            return
        for (method, mode, fact_class), rows in table3.groupby(["method", "mode", "class"], sort=False):
            avg = {r.kn_set: float(r.avg) for r in records(rows)}
            if not {"cas", "self", "union"} <= set(avg):
                continue
            paper = self.paper.quote_each(
                "table3",
                "avg",
                self.reference,
                {
                    SET_NAMES[s]: {"mode": mode, "class": fact_class, "kn_set": s}
                    for s in ("cas", "self", "union")
                },
            )
            measured = " / ".join(f"{SET_NAMES[s]} {format_number(avg[s])}" for s in ("cas", "self", "union"))
            best_other = max(avg["self"], avg["union"])
            self.add(
                "cas",
                f"{method.upper()} {mode}, {fact_class} facts: Avg of CAS vs Self / Union",
                measured,
                paper,
                "agrees" if avg["cas"] > best_other else "differs",
                f"CAS {'above' if avg['cas'] > best_other else 'not above'} the better of Self and Union",
            )
