"""What the consistency study shows: the captions of its panels (Table 1, Figures 3/7/8/9, the
KN-rule sensitivity, the per-fact scores) and its claim rules (Table 1: KI shares, the chance
baseline, Welch's t, U_KI; what the model knows)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..numbers import format_number, format_share
from .claims import (
    KNOWN_RANK,
    SIGNIFICANCE,
    SMALL_SAMPLE,
    ClaimRules,
    records,
)
from .knsets import STATIC_THRESHOLD
from .paper import PaperQuote, no_paper_number
from .registry import Caption, Frames, Panel, count_text


def _table1(t: Frames, panel: Panel) -> str:
    frame = t["table1"]
    chance = (
        " cs_null_mean / cs_null_p95: mean and 95th percentile of CS for groups of queries drawn from "
        "different facts (chance); R_above_null: share of facts above it."
        if "cs_null_p95" in frame
        else ""
    )
    return (
        f"KN consistency over {count_text(frame, 'facts')} facts per model and method. R_KI / R_KC: share "
        "of facts (0-1) that are inconsistent / consistent; CS_KI / CS_KC: their mean consistency score "
        "(share of a fact's KN union held by two or more of its queries, 0-1); t, p: Welch's t-test of KC "
        "against KI; U_KI: share of facts every method classes KI; empty_union: facts without any KN. KC "
        f"means CS >= the threshold: static {STATIC_THRESHOLD:g}, or Otsu's per run." + chance
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


CAPTIONS: dict[str, Caption] = {
    "table1": _table1,
    "relations_{method}": _relations,
    "fig9_ki_share": (
        "Share of KI facts (0-1) as the static threshold runs from 0.04 to 0.80, one curve per model and "
        "method. A curve that rises early means most facts have a low CS."
    ),
    "threshold_sensitivity": (
        "KI shares and CS_KC per KN rule (t = KNs score at least t x the top score; topN = the N best "
        "neurons) with the chance baseline: whether the KI share depends on how KN sets are cut."
    ),
    "consistency": (
        "Per fact and method: CS (relaxed and strict), size of the KN union and the KC/KI classes; {rows} "
        "rows. The fact explorer shows each fact's KN sets."
    ),
}
"""The consistency study's captions, by panel key (:data:`qloc.studies.registry.Caption`)."""

NO_CHANCE_BASELINE = no_paper_number("the paper has no chance baseline")


class ConsistencyClaims(ClaimRules):
    """The consistency study's claims: what the model knows, then Table 1's."""

    def check(self) -> None:
        self.knowledge()
        self.consistency()

    # -- Table 1 ---------------------------------------------------------------------------
    def consistency(self) -> None:
        table1 = self.table("table1")
        if table1 is None:
            self.context.append("No Table 1: the directories hold no KN sets of this model.")
            return
        chance_columns = {"R_above_null", "cs_null_p95", "cs_null_mean"} <= set(table1.columns)
        all_kc: list[tuple[str, int]] = []
        for method, rows in table1.groupby("method", sort=False):
            label = method.upper()
            degenerate = "degenerate" in rows and bool(rows["degenerate"].fillna(False).astype(bool).any())
            if degenerate:
                self.warnings.append(
                    f"{label} is flagged degenerate on this architecture: its classes say nothing "
                    "about the model and it is left out of U_KI."
                )
            for row in records(rows):
                self._ki_share(method, row, degenerate)
                if row.threshold == "static" and row.R_KI == 0:
                    all_kc.append((label, int(row.facts)))
                if getattr(row, "empty_union", 0) and row.empty_union > 0:
                    self.warnings.append(
                        f"{label}: {int(row.empty_union)} of {int(row.facts)} facts have no KN in any "
                        "query (empty KN sets: CS 0, counted as KI)."
                    )
            static = rows[rows.threshold == "static"]
            if chance_columns and not static.empty:
                row = static.iloc[0]
                self.add(
                    "ki_share",
                    f"{label}: facts whose CS beats chance (95th percentile of the null, "
                    f"{format_number(row.cs_null_p95)})",
                    format_share(row.R_above_null, int(row.facts)),
                    NO_CHANCE_BASELINE,
                    "open",
                    getattr(row, "chance", None) or f"null mean CS {format_number(row.cs_null_mean)}",
                )
                if not degenerate and not math.isnan(row.CS_KC) and row.CS_KC <= row.cs_null_p95:
                    self.warnings.append(
                        f"{label}: the mean CS of KC facts ({format_number(row.CS_KC)}) is not "
                        f"above chance ({format_number(row.cs_null_p95)}): KN sets of one fact's "
                        "queries overlap no more than those of unrelated queries."
                    )
        if all_kc:
            self.warnings.append(
                ", ".join(f"{label} ({facts} facts)" for label, facts in all_kc)
                + ": every fact is KC under the static threshold, so there is nothing to compare KC with "
                "(no Welch test, no KI rows in Tables 2/3)."
            )
        if not chance_columns:
            self.add(
                "ki_share",
                "facts whose CS beats chance",
                "not computed",
                NO_CHANCE_BASELINE,
                "open",
                "table1.csv has no chance baseline (cs_null_* columns)",
            )
        self._welch(table1)
        self._u_ki(table1)
        self._cs_variant()

    def _cs_variant(self) -> None:
        """Which count rule of CS (relaxed, majority, strict: the ablation's group g) brings the static
        split nearest the paper's cells: the paper's equation 1 was lost from its text."""
        ablation = self.table("cs_ablation")
        if ablation is None or "g" not in set(ablation["group"]):
            return
        columns = ("R_KI", "CS_KC", "CS_KI")
        for method, rows in ablation[ablation["group"] == "g"].groupby("method", sort=False):
            paper = {
                c: self.paper.cell("table1", c, self.reference, method=method, threshold="static")
                for c in columns
            }
            if any(v is None for v in paper.values()):
                continue
            gaps = {
                row.setting: sum(abs(getattr(row, f"{c}_static") - paper[c]) for c in columns)
                for row in records(rows)
                if not any(math.isnan(getattr(row, f"{c}_static")) for c in columns)
            }
            if not gaps:
                continue
            best = min(gaps, key=lambda s: gaps[s])
            measured = "; ".join(
                f"{row.setting}: " + " / ".join(format_number(getattr(row, f"{c}_static")) for c in columns)
                for row in records(rows)
            )
            cells = " / ".join(format_number(paper[c]) for c in columns)
            self.add(
                "ki_share",
                f"{method.upper()}: R_KI / CS_KC / CS_KI (static) under each CS count rule",
                measured,
                PaperQuote(
                    f"{cells} (R_KI / CS_KC / CS_KI)", tuple(v for v in paper.values() if v is not None)
                ),
                "open",
                f"nearest the paper's cells: {best} (summed gap {format_number(gaps[best])})",
            )

    def _paper_range_verdict(self, quote: PaperQuote, value: float, what: str) -> tuple[str, str]:
        if quote.contains(value):
            return "agrees", ""
        side = "below" if quote.low is not None and value < quote.low else "above"
        return "differs", f"{side} the paper's range{what}"

    def _ki_share(self, method: str, row: Any, degenerate: bool) -> None:
        """R_KI, CS_KC and CS_KI of one Table 1 row, each beside the paper's cell of the same method
        and threshold: a direction agrees where qloc's number lies in the range over the paper's models."""
        label, facts, keys = method.upper(), int(row.facts), {"method": method, "threshold": row.threshold}
        quote = self.paper.quote("table1", "R_KI", self.reference, share=True, **keys)
        if degenerate:
            verdict, note = "open", "method degenerate here"
        elif row.R_KI == 0:
            verdict, note = "differs", "no KI facts"
        else:
            verdict, note = self._paper_range_verdict(quote, row.R_KI, "")
        measure = f"{label}: KI share, {row.threshold} threshold {format_number(row.threshold_value)}"
        self.add("ki_share", measure, format_share(row.R_KI, facts), quote, verdict, note)
        if row.threshold == "otsu":
            self.add(
                "ki_share",
                f"{label}: Otsu's threshold (the paper's Table 4)",
                format_number(row.threshold_value),
                self.paper.quote("table4", "value", self.reference, **keys),
                "open",
                "a threshold is a setting the data choose, not a claim",
            )
        for column, why in (
            ("CS_KC", ": KN sets of one fact's queries overlap more than the paper's"),
            ("CS_KI", ""),
        ):
            value = getattr(row, column)
            if math.isnan(value):
                continue
            quote = self.paper.quote("table1", column, self.reference, **keys)
            verdict, note = (
                ("open", "method degenerate here")
                if degenerate
                else self._paper_range_verdict(quote, value, why if value > (quote.high or 0) else "")
            )
            self.add(
                "ki_share",
                f"{label}: mean CS of {column[3:]} facts, {row.threshold} threshold",
                format_number(value),
                quote,
                verdict,
                note,
            )

    def _welch(self, table1: pd.DataFrame) -> None:
        for row in records(table1):
            label = row.method.upper()
            measure = f"{label}: Welch's t (KC vs KI), {row.threshold} threshold"
            quote = self.paper.quote(
                "table1", "t", self.reference, method=row.method, threshold=row.threshold
            )
            measured = "–" if math.isnan(row.t) else f"t = {format_number(row.t)}, p = {format_number(row.p)}"
            if bool(getattr(row, "degenerate", False)):
                self.add("welch", measure, measured, quote, "open", "method degenerate here")
                continue
            if math.isnan(row.t) or math.isnan(row.p):
                self.add("welch", measure, "–", quote, "open", "fewer than 2 facts in a class")
                continue
            if row.t > 0 and row.p < SIGNIFICANCE:
                self.add("welch", measure, measured, quote, "agrees", "the paper prints no p")
            else:
                why = "KC's CS not above KI's" if row.t <= 0 else f"not significant at {SIGNIFICANCE}"
                self.add("welch", measure, measured, quote, "differs", why)

    def _u_ki(self, table1: pd.DataFrame) -> None:
        methods = table1["method"].nunique()
        for threshold, rows in table1.groupby("threshold", sort=False):
            row = rows.iloc[0]
            quote = self.paper.quote("table1_u_ki", "U_KI", self.reference, share=True, threshold=threshold)
            measure = f"U_KI: KI under every method, {threshold} threshold"
            if math.isnan(row.U_KI):
                self.add("u_ki", measure, "–", quote, "open", "needs two or more methods")
                continue
            verdict, note = (
                ("differs", "no fact is KI under every method")
                if row.U_KI == 0
                else (self._paper_range_verdict(quote, row.U_KI, ""))
            )
            if methods < 3:
                note = "; ".join(filter(None, [note, f"over {methods} methods; the paper uses three"]))
            self.add("u_ki", measure, format_share(row.U_KI, int(row.facts)), quote, verdict, note)

    # -- what the model knows, and empty KN sets -------------------------------------------
    def knowledge(self) -> None:
        kn_sets = self.evidence.kn_sets
        if kn_sets is None or kn_sets.empty or kn_sets["rank"].isna().all():
            return
        queries = kn_sets.drop_duplicates(["fact_id", "query_index"])
        best = queries.groupby("fact_id")["rank"].min()
        facts, known = len(best), int((best < KNOWN_RANK).sum())
        top1, top10 = float((queries["rank"] == 0).mean()), float((queries["rank"] < KNOWN_RANK).mean())
        self.context.append(
            f"{facts:,} facts, {len(queries):,} queries. The model ranks the answer first on "
            f"{format_share(top1)} of queries and in its top {KNOWN_RANK} on {format_share(top10)}; "
            f"{known:,} of {facts:,} facts ({format_share(known / facts)}) are known (top "
            f"{KNOWN_RANK}) by at least one query."
        )
        if facts < SMALL_SAMPLE:
            self.warnings.append(
                f"Only {facts} facts: one fact moves every share by {format_share(1 / facts)}, so read "
                "each direction as an anecdote, not a finding."
            )
        if known < facts / 2:
            self.warnings.append(
                f"Most facts are unknown to the model: {facts - known:,} of {facts:,} have the answer "
                f"outside the top {KNOWN_RANK} on every query. KN attribution of a fact the model "
                "does not know localizes whatever raises an improbable token."
            )
        empty = kn_sets[kn_sets["kn_size"] == 0].groupby("method").size()
        for method, count in empty.items():
            self.warnings.append(
                f"{method.upper()}: {count:,} of {int((kn_sets['method'] == method).sum()):,} "
                "queries have an empty KN set."
            )
