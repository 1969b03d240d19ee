"""The report's "at a glance" section: what a run found, claim by claim of the paper, beside the
paper's number for the closest model it reports, with a mark where qloc's result goes the paper's
way and where it does not, and words for numbers that signal a broken setting.

The paper's tables and claims live in ``data/paper_reference.json`` (:mod:`qloc.report.paper`);
the rules that decide a direction live here and in the claims modules, one function per claim. A
direction (✓ or ✗) needs two numbers, qloc's and the paper's: where the paper has no cell, the
finding is "no call" and says why (:meth:`ClaimRules.add` enforces it for every rule). Every rule reads
the tables the commands write (``tables/*.csv``) and, where it needs per-query or per-edit data,
the run store; columns that newer qloc versions add (a chance baseline of CS, catastrophic-edit
shares, medians) are used when present and said to be missing otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .format import format_number
from .paper import PaperQuote, PaperReference
from .sections import RunSection

SIGNIFICANCE = 0.05
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
    "random": "Random (control)",
    "intersection": "Intersection",
    "refine": "Refine",
    "unrelated": "Unrelated",
}
VERDICTS = {"agrees": "✓ agrees", "differs": "✗ differs", "open": "– no call", "broken": "⚠ broken"}


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


def records(frame: pd.DataFrame) -> Iterator[Any]:
    """A table's rows as records with a field per column (typed loosely: columns hold any value)."""
    yield from frame.itertuples(index=False)


def weighted(rows: pd.DataFrame, column: str) -> float:
    """A share column of table rows (one per fact class) over all their facts; NaN where absent."""
    if column not in rows or rows[column].isna().all():
        return float("nan")
    return float((rows[column] * rows["facts"]).sum() / rows["facts"].sum())


def sign_word(value: float) -> str:
    return "rises" if value > 0 else "falls" if value < 0 else "stays"


class ClaimRules:
    """What every claim's rule works with: one model's evidence, the paper, and what it found."""

    def __init__(self, evidence: Evidence, paper: PaperReference, reference: str) -> None:
        self.evidence, self.paper, self.reference = evidence, paper, reference
        self.findings: list[Finding] = []
        self.warnings: list[str] = []
        self.context: list[str] = []

    def add(
        self, claim: str, measure: str, measured: str, paper: PaperQuote, verdict: str, note: str = ""
    ) -> None:
        """Records a finding. A direction without the paper's number is no verdict: it becomes "no
        call", with why, and the direction qloc measured kept in words."""
        if verdict in ("agrees", "differs") and not paper.has_number:
            way = "as the paper describes it" if verdict == "agrees" else "not as the paper describes it"
            note = f"no call (no paper number); qloc's result goes {way}" + (f": {note}" if note else "")
            verdict = "open"
        self.findings.append(Finding(claim, measure, measured, paper.text, verdict, note))

    def table(self, name: str) -> pd.DataFrame | None:
        frame = self.evidence.tables.get(name)
        return frame if frame is not None and not frame.empty else None


def gather_evidence(sections: list[RunSection]) -> list[Evidence]:
    """One :class:`Evidence` per model: Table 1 rows from any directory that has them (a
    consistency directory may hold several models), the other tables and store data from run
    directories of that model. The first directory that holds a table wins, except that a Table 1
    that ``qloc consistency`` wrote wins over one the report computed from a single run's store
    (the written one may combine runs, such as a separate SIG run)."""
    by_model: dict[str, Evidence] = {}

    def evidence(model: str) -> Evidence:
        return by_model.setdefault(model, Evidence(model))

    with_table1 = [s for s in sections if "table1" in s.tables]
    for section in sorted(with_table1, key=lambda s: s.tables["table1"].computed):
        table1 = section.tables["table1"].frame
        label = section.model or section.directory.name
        for model, rows in table1.groupby("model", sort=False) if "model" in table1 else [(label, table1)]:
            found = evidence(str(model))
            found.sources.append(str(section.directory))
            found.tables.setdefault("table1", rows.reset_index(drop=True))
    for section in sections:
        label = section.model or section.directory.name
        if section.model is None and not (set(section.tables) - {"table1"} - _CONSISTENCY_TABLES):
            continue
        found = evidence(label)
        if str(section.directory) not in found.sources:
            found.sources.append(str(section.directory))
        for name, table in section.tables.items():
            if name != "table1":
                found.tables.setdefault(name, table.frame)
        found.d_ff = found.d_ff or section.environment.get("model", {}).get("d_ff")
        if found.kn_sets is None and "kn_sets" in section.store:
            found.kn_sets = section.store["kn_sets"]
        if found.edits is None and "edits" in section.store:
            found.edits = section.store["edits"]
    return list(by_model.values())


_CONSISTENCY_TABLES = {
    "consistency",
    "fig9_ki_share",
    "threshold_sensitivity",
    "cs_ablation",
    "cs_by_queries",
    "table1_by_knowledge",
} | {f"relations_{m}" for m in ("ig", "amig", "sig")}
