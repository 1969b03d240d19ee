"""The report's claims about KN consistency (Table 1: KI shares, the chance baseline, Welch's t,
U_KI) and about what the model knows."""

from __future__ import annotations

import math

import pandas as pd

from .findings import (
    KNOWN_RANK,
    SIGNIFICANCE,
    SMALL_SAMPLE,
    ClaimRules,
    paper_text,
    records,
)
from .format import format_number, format_share


class ConsistencyClaims(ClaimRules):
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
                facts = int(row.facts)
                measure = f"{label}: KI share, {row.threshold} threshold {format_number(row.threshold_value)}"
                paper = self.paper.value_text(
                    "ki_share", self.reference, f"{method} {row.threshold}", share=True
                )
                quoted = self.paper.quoted_range("ki_share", f"{method} {row.threshold}")
                if degenerate:
                    verdict, note = "open", "method degenerate here"
                elif row.R_KI == 0:
                    verdict, note = "differs", "no KI facts"
                elif quoted is not None and not quoted["low"] <= row.R_KI <= quoted["high"]:
                    # KI facts exist, but a share far outside the paper's is not its finding.
                    side = "below" if row.R_KI < quoted["low"] else "above"
                    verdict, note = "differs", f"{side} the paper's range"
                else:
                    verdict, note = "agrees", ""
                self.add(
                    "ki_share",
                    measure,
                    format_share(row.R_KI, facts),
                    paper,
                    verdict,
                    note,
                )
                if row.threshold == "static" and row.R_KI == 0:
                    all_kc.append((label, facts))
                if getattr(row, "empty_union", 0) and row.empty_union > 0:
                    self.warnings.append(
                        f"{label}: {int(row.empty_union)} of {facts} facts have no KN in any "
                        "query (empty KN sets: CS 0, counted as KI)."
                    )
            static = rows[rows.threshold == "static"]
            if not static.empty and not math.isnan(static.iloc[0].CS_KC):
                self.add(
                    "ki_share",
                    f"{label}: mean CS of KC facts, static threshold",
                    format_number(static.iloc[0].CS_KC),
                    self.paper.value_text("ki_share", self.reference, f"{method} static CS_KC"),
                    "open",
                    "higher: KN sets of one fact's queries overlap more",
                )
            if chance_columns and not static.empty:
                row = static.iloc[0]
                self.add(
                    "ki_share",
                    f"{label}: facts whose CS beats chance (95th percentile of the null, "
                    f"{format_number(row.cs_null_p95)})",
                    format_share(row.R_above_null, int(row.facts)),
                    "no chance baseline in the paper",
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
                "no chance baseline in the paper",
                "open",
                "table1.csv has no chance baseline (cs_null_* columns)",
            )
        self._welch(table1)
        self._u_ki(table1)

    def _welch(self, table1: pd.DataFrame) -> None:
        for row in records(table1):
            label = row.method.upper()
            measure = f"{label}: Welch's t (KC vs KI), {row.threshold} threshold"
            keys = {"t =": f"{row.method} {row.threshold} t", "p =": f"{row.method} {row.threshold} p"}
            paper = self.paper.quote("welch", self.reference, keys)
            if math.isnan(row.t) or math.isnan(row.p):
                self.add("welch", measure, "–", paper, "open", "fewer than 2 facts in a class")
                continue
            measured = f"t = {format_number(row.t)}, p = {format_number(row.p)}"
            if row.t > 0 and row.p < SIGNIFICANCE:
                self.add("welch", measure, measured, paper, "agrees")
            else:
                why = "KC's CS not above KI's" if row.t <= 0 else f"not significant at {SIGNIFICANCE}"
                self.add("welch", measure, measured, paper, "differs", why)

    def _u_ki(self, table1: pd.DataFrame) -> None:
        methods = table1["method"].nunique()
        for kind, rows in table1.groupby("threshold", sort=False):
            row = rows.iloc[0]
            paper = paper_text(self.paper.value("u_ki", self.reference, kind), share=True)
            measure = f"U_KI: KI under every method, {kind} threshold"
            if math.isnan(row.U_KI):
                self.add("u_ki", measure, "–", paper, "open", "needs two or more methods")
                continue
            note = "" if methods >= 3 else f"over {methods} methods; the paper uses three"
            self.add(
                "u_ki",
                measure,
                format_share(row.U_KI, int(row.facts)),
                paper,
                "agrees" if row.U_KI > 0 else "differs",
                note,
            )

    # -- what the model knows, and empty KN sets -------------------------------------------
    def knowledge(self) -> None:
        kn_sets = self.evidence.kn_sets
        if kn_sets is None or kn_sets.empty or "rank" not in kn_sets:
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
