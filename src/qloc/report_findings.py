"""The report's "at a glance" section: what a run found, claim by claim of the paper, beside the
paper's number for the closest model it reports, with a mark where qloc's result goes the paper's
way and where it does not, and words for numbers that signal a broken setting.

The paper's values and claims live in ``data/paper_reference.json`` (with their table
references); the rules that decide a direction live here, one function per claim. Every rule reads
the tables the commands write (``tables/*.csv``) and, where it needs per-query or per-edit data,
the run store; columns that newer qloc versions add (a chance baseline of CS, catastrophic-edit
shares, medians) are used when present and said to be missing otherwise.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from .errors import QlocError
from .report_format import format_number, format_share

SIGNIFICANCE = 0.05
BROKEN_DPPL = 1.0
"""A median edit with dPPL above 1 more than doubles perplexity: the model is broken, not edited."""
KNOWN_RANK = 10
"""A query "knows" its fact when the answer's first token is among the model's top 10."""
LARGE_MODEL = 1e9
LARGE_MLP_WIDTH = 8192
"""Where a model's name gives no size: MLP widths from this up count as large (GPT-2: 3,072;
LLaMA3-8b: 14,336)."""
SMALL_SAMPLE = 30
"""Fewer facts than this make every share anecdotal; the report says so."""
SET_NAMES = {
    "self": "Self",
    "union": "Union",
    "cas": "CAS",
    "intersection": "Intersection",
    "refine": "Refine",
    "unrelated": "Unrelated",
}
VERDICTS = {"agrees": "✓ agrees", "differs": "✗ differs", "open": "– no call", "broken": "⚠ broken"}


@dataclass
class PaperReference:
    """The paper's claims and values (``data/paper_reference.json``)."""

    paper: str
    models: dict[str, str]
    claims: dict[str, dict]

    def value(self, claim: str, model: str, key: str) -> float | None:
        return self.claims[claim]["values"].get(model, {}).get(key)

    def quoted_range(self, claim: str, key: str) -> dict | None:
        """The range over the paper's models and methods that the claim quotes for ``key`` (a range
        matches a key holding all of its words; the most specific wins), or None."""
        words = set(key.split())
        matching = [p for p in self.claims[claim].get("ranges", {}) if set(p.split()) <= words]
        if not matching:
            return None
        return self.claims[claim]["ranges"][max(matching, key=lambda p: len(p.split()))]

    def values_text(self, claim: str, model: str, labelled_keys: dict[str, str], separator: str) -> str:
        """The paper's values for several keys, each after its label (``{label: key}``), joined by
        ``separator``; "not transcribed" when none of them is."""
        values = {label: self.value(claim, model, key) for label, key in labelled_keys.items()}
        if all(value is None for value in values.values()):
            return "not transcribed"
        return separator.join(f"{label}{_paper_text(value)}" for label, value in values.items())

    def value_text(self, claim: str, model: str, key: str, share: bool = False) -> str:
        """The paper's value for ``key``, or else the range it quotes, or "not transcribed"."""
        value = self.value(claim, model, key)
        if value is not None:
            return _paper_text(value, share)
        quoted = self.quoted_range(claim, key)
        if quoted is None:
            return "not transcribed"
        low, high = quoted["low"], quoted["high"]
        shown = (f"{format_share(low)}-{format_share(high)}" if quoted.get("share")
                 else f"{format_number(low)}-{format_number(high)}")
        return f"{shown} (range over the paper's models)"

    def where(self, claim: str) -> str:
        return self.claims[claim]["where"]

    def text(self, claim: str) -> str:
        return self.claims[claim]["claim"]


def load_paper_reference(path: Path | None = None) -> PaperReference:
    """The reference shipped with qloc, or another file of the same form."""
    source = path or resources.files("qloc") / "data" / "paper_reference.json"
    try:
        data = json.loads(Path(str(source)).read_text(encoding="utf-8"))
        claims = data["claims"]
        for name, claim in claims.items():
            missing = [key for key in ("where", "claim", "values") if key not in claim]
            if missing:
                raise KeyError(f"claim {name!r} has no {', '.join(missing)}")
        return PaperReference(data["paper"], data["reference_models"], claims)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QlocError(f"paper reference {str(source)!r} cannot be read: {exc!r}") from None


@dataclass
class Evidence:
    """What the report holds of one model: the result tables of its directories (Table 1 rows of
    this model only) and the store tables the rules need."""

    model: str
    sources: list[str] = field(default_factory=list)
    d_ff: int | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    kn_sets: pd.DataFrame | None = None
    edits: pd.DataFrame | None = None


@dataclass
class Finding:
    claim: str
    """Key of the claim in the paper reference."""
    measure: str
    measured: str
    paper: str
    verdict: str
    """One of :data:`VERDICTS`."""
    note: str = ""


@dataclass
class ModelFindings:
    model: str
    reference: str
    reference_reason: str
    context: list[str]
    warnings: list[str]
    findings: list[Finding]


def parameters_from_name(name: str) -> float | None:
    """The parameter count a model's name states (``smollm2-135m``, ``Llama-3-8B``), or None."""
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)([mb])(?![a-z])", name.lower())
    if not match:
        return None
    return float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9)


def reference_model(model: str, d_ff: int | None, paper: PaperReference) -> tuple[str, str]:
    """The paper's model to compare with, and why: by the size in the model's name, else by its
    MLP width (GPT-2's is 3,072, LLaMA3-8b's 14,336)."""
    size = parameters_from_name(model)
    if size is not None:
        small = size < LARGE_MODEL
        reason = f"{format_number(size / 1e6)}M parameters by its name"
    elif d_ff is not None:
        small = d_ff < LARGE_MLP_WIDTH
        reason = f"MLP width {d_ff:,}, {'under' if small else 'over'} {LARGE_MLP_WIDTH:,}"
    else:
        small, reason = True, "size unknown"
    return paper.models["small" if small else "large"], reason


def _paper_text(value: float | None, share: bool = False) -> str:
    if value is None:
        return "not transcribed"
    return format_share(value) if share else format_number(value)


def _weighted(rows: pd.DataFrame, column: str) -> float:
    """A share column of table rows (one per fact class) over all their facts; NaN where absent."""
    if column not in rows or rows[column].isna().all():
        return float("nan")
    return float((rows[column] * rows["facts"]).sum() / rows["facts"].sum())


def _sign_word(value: float) -> str:
    return "rises" if value > 0 else "falls" if value < 0 else "stays"


class _Rules:
    """Applies every claim's rule to one model's evidence."""

    def __init__(self, evidence: Evidence, paper: PaperReference, reference: str) -> None:
        self.evidence, self.paper, self.reference = evidence, paper, reference
        self.findings: list[Finding] = []
        self.warnings: list[str] = []
        self.context: list[str] = []

    def add(self, claim: str, measure: str, measured: str, paper: str, verdict: str, note: str = "") -> None:
        self.findings.append(Finding(claim, measure, measured, paper, verdict, note))

    def table(self, name: str) -> pd.DataFrame | None:
        frame = self.evidence.tables.get(name)
        return frame if frame is not None and not frame.empty else None

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
            for row in rows.itertuples(index=False):
                facts = int(row.facts)
                measure = f"{label}: KI share, {row.threshold} threshold {format_number(row.threshold_value)}"
                paper = self.paper.value_text("ki_share", self.reference, f"{method} {row.threshold}", share=True)
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
                    f"null mean CS {format_number(row.cs_null_mean)}",
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
        for row in table1.itertuples(index=False):
            label = row.method.upper()
            measure = f"{label}: Welch's t (KC vs KI), {row.threshold} threshold"
            key = f"{row.method} {row.threshold}"
            paper = self.paper.values_text("welch", self.reference, {"t = ": f"{key} t", "p = ": f"{key} p"}, ", ")
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
            paper = _paper_text(self.paper.value("u_ki", self.reference, kind), share=True)
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

    # -- Tables 2 and 3 ----------------------------------------------------------------------
    def _gen(self, rows: pd.DataFrame, kind: str, kn_set: str) -> float | None:
        picked = rows[(rows["class"] == kind) & (rows["kn_set"] == kn_set)]
        return float(picked["gen"].iloc[0]) if len(picked) else None

    def generalisation(self) -> None:
        table2 = self.table("table2")
        if table2 is None:
            return
        for (method, mode), rows in table2.groupby(["method", "mode"], sort=False):
            gaps = {}
            for kind in ("KC", "KI"):
                self_gen, union_gen = self._gen(rows, kind, "self"), self._gen(rows, kind, "union")
                if self_gen is not None and union_gen is not None:
                    gaps[kind] = (self_gen, union_gen)
            for kind, (self_gen, union_gen) in gaps.items():
                measure = f"{method.upper()} {mode}, {kind} facts: Gen through Self vs Union"
                paper = self.paper.values_text(
                    "self_union_generalisation",
                    self.reference,
                    {"Self ": f"{mode} {kind} self", "Union ": f"{mode} {kind} union"},
                    " / ",
                )
                measured = f"Self {format_number(self_gen)} / Union {format_number(union_gen)}"
                if kind == "KI":
                    verdict = "agrees" if union_gen > self_gen else "differs"
                    self.add(
                        "self_union_generalisation",
                        measure,
                        measured,
                        paper,
                        verdict,
                        (
                            "Union reaches the other queries, Self does not"
                            if verdict == "agrees"
                            else "Self generalises as well as Union"
                        ),
                    )
                elif "KI" in gaps:
                    kc_gap, ki_gap = union_gen - self_gen, gaps["KI"][1] - gaps["KI"][0]
                    self.add(
                        "self_union_generalisation",
                        measure,
                        measured,
                        paper,
                        "agrees" if kc_gap < ki_gap else "differs",
                        f"Union - Self: KC {format_number(kc_gap)}, KI {format_number(ki_gap)}",
                    )
                else:
                    self.add(
                        "self_union_generalisation",
                        measure,
                        measured,
                        paper,
                        "open",
                        "no KI facts to compare with",
                    )

    def perplexity(self) -> None:
        table2 = self.table("table2")
        if table2 is None:
            return
        edits = self.evidence.edits
        broken: dict[str, list[str]] = {}
        sets_by_mode = self.table("table3") if self.table("table3") is not None else table2
        for (method, mode), rows in sets_by_mode.groupby(["method", "mode"], sort=False):
            for kn_set in dict.fromkeys(rows["kn_set"]):
                part = rows[rows["kn_set"] == kn_set]
                if edits is not None and {"mode", "kn_set", "dppl"} <= set(edits.columns):
                    chosen = edits[
                        (edits["method"] == method) & (edits["mode"] == mode) & (edits["kn_set"] == kn_set)
                    ]["dppl"].dropna()
                    median, catastrophic, count = chosen.median(), (chosen > BROKEN_DPPL).mean(), len(chosen)
                elif "dppl_median" in part:
                    median, count = part["dppl_median"].median(), int(part["facts"].sum())
                    catastrophic = _weighted(part, "catastrophic")
                else:
                    continue
                name = SET_NAMES.get(kn_set, kn_set)
                paper_values = {
                    kind: self.paper.value_text("dppl", self.reference, f"{mode} {kind} {kn_set}")
                    for kind in ("KC", "KI")
                }
                if len(set(paper_values.values())) == 1:
                    paper = paper_values["KC"]
                else:
                    paper = " / ".join(f"{kind} {text}" for kind, text in paper_values.items())
                notes = (
                    []
                    if math.isnan(catastrophic)
                    else [f"{format_share(catastrophic, count)} of edits above 1"]
                )
                moved = _weighted(part, "moved_right")
                if not math.isnan(moved):
                    notes.append(f"{format_share(moved)} moved P(answer) the intended way")
                if median > BROKEN_DPPL:
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
        for (method, mode, kind), rows in table3.groupby(["method", "mode", "class"], sort=False):
            avg = {r.kn_set: float(r.avg) for r in rows.itertuples(index=False)}
            if not {"cas", "self", "union"} <= set(avg):
                continue
            keys = {f"{SET_NAMES[s]} ": f"{mode} {kind} {s}" for s in ("cas", "self", "union")}
            paper = self.paper.values_text("cas", self.reference, keys, " / ")
            measured = " / ".join(f"{SET_NAMES[s]} {format_number(avg[s])}" for s in ("cas", "self", "union"))
            best_other = max(avg["self"], avg["union"])
            self.add(
                "cas",
                f"{method.upper()} {mode}, {kind} facts: Avg of CAS vs Self / Union",
                measured,
                paper,
                "agrees" if avg["cas"] > best_other else "differs",
                f"CAS {'above' if avg['cas'] > best_other else 'not above'} the better of Self and Union",
            )

    # -- Figures 4 and 6 --------------------------------------------------------------------
    def mapping(self) -> None:
        table = self.table("fig4_mapping")
        if table is None:
            return
        column = "dprob_median" if "dprob_median" in table else "dprob"
        statistic = "median" if column == "dprob_median" else "mean"
        classes = [c for c in ("KC", "KI") if c in set(table["class"])] or ["Avg"]
        for (method, operation), rows in table.groupby(["method", "operation"], sort=False):
            direction = -1.0 if operation == "suppress" else 1.0
            for kind in classes:
                part = rows[rows["class"] == kind]
                effect = {r.kn_set: float(getattr(r, column)) for r in part.itertuples(index=False)}
                if not {"self", "intersection", "refine", "unrelated"} <= set(effect):
                    continue
                order = sorted(effect, key=lambda s: -direction * effect[s])
                measured = "; ".join(f"{SET_NAMES[s]} {format_number(effect[s])}" for s in order)
                self_first = direction * effect["self"] > max(
                    direction * effect[s] for s in ("intersection", "refine")
                )
                unrelated_last = order[-1] == "unrelated"
                paper = self.paper.values_text(
                    "mapping", self.reference, {f"{SET_NAMES[s]} ": f"{operation} {kind} {s}" for s in effect}, "; "
                )
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
                    f"{method.upper()} {operation}, {kind}: {statistic} dProb per KN set, " "strongest first",
                    measured,
                    paper,
                    "agrees" if not misses else "differs",
                    "; ".join(misses),
                )

    def synapses(self) -> None:
        for name, measure_name in (
            ("fig6_synapses", "dKN of mean activation"),
            ("fig6_synapses_magnitude", "dKN of mean |activation|"),
        ):
            table = self.table(name)
            if table is None:
                continue
            suffix = "_abs" if name.endswith("magnitude") else ""
            for row in table[table["class"] == "Avg"].itertuples(index=False):
                values = row._asdict()
                statistic = "median" if f"dkn_kn{suffix}_median" in values else "mean"
                dkn = values[f"dkn_kn{suffix}_{statistic}"]
                dprob = values.get(f"dprob_{statistic}", values.get("dprob_mean"))
                direction = -1 if row.operation == "suppress" else 1
                right = [direction * dkn > 0, direction * dprob > 0]
                key = f"{row.operation} Avg"
                paper = self.paper.values_text(
                    "synapses", self.reference, {"dKN ": f"{key} dkn", "dProb ": f"{key} dprob"}, ", "
                )
                note = (
                    ""
                    if all(right)
                    else (f"query's KN activation {_sign_word(dkn)}, " f"P(answer) {_sign_word(dprob)}")
                )
                self.add(
                    "synapses",
                    f"{row.method.upper()} {row.operation} KS, {row.queries} queries: "
                    f"{statistic} {measure_name}, dProb",
                    f"dKN {format_number(dkn)}, dProb {format_number(dprob)}",
                    paper,
                    "agrees" if all(right) else "differs",
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


def model_findings(evidence: Evidence, paper: PaperReference) -> ModelFindings:
    """Every finding of one model, its warnings and context lines."""
    reference, reason = reference_model(evidence.model, evidence.d_ff, paper)
    rules = _Rules(evidence, paper, reference)
    if evidence.sources:
        rules.context.append(f"From {', '.join(evidence.sources)}.")
    rules.knowledge()
    rules.consistency()
    rules.generalisation()
    rules.perplexity()
    rules.cas()
    rules.mapping()
    rules.synapses()
    return ModelFindings(evidence.model, reference, reason, rules.context, rules.warnings, rules.findings)
