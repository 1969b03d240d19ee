"""What a study's claim rules work with: a rule checks one claim of the paper against what a run
found, beside the paper's number for the closest model it reports, and says whether qloc's result
goes the paper's way (✓), does not (✗), or cannot say. Each study declares its rules beside it (a
:class:`ClaimRules` subclass in its ``*_claims`` module, named by its registry entry); the report
gathers every study's (:mod:`qloc.report.findings`).

The paper's tables and claims live in ``data/paper_reference.json`` (:mod:`qloc.studies.paper`). A
direction (✓ or ✗) needs two numbers, qloc's and the paper's: where the paper has no cell, the
finding is "no call" and says why (:meth:`ClaimRules.add` enforces it for every rule). Every rule
reads the tables the commands write (``tables/*.csv``) and, where it needs per-query or per-edit
data, the run store; columns that newer qloc versions add (a chance baseline of CS,
catastrophic-edit shares, medians) are used when present and said to be missing otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .paper import PaperQuote, PaperReference

SIGNIFICANCE = 0.05
KNOWN_RANK = 10
"""A query "knows" its fact when the answer's first token is among the model's top 10."""
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
    """What every claim's rule works with: one model's evidence, the paper, and what it found. A
    study's subclass runs its rules, in order, in :meth:`check`."""

    def __init__(self, evidence: Evidence, paper: PaperReference, reference: str) -> None:
        self.evidence, self.paper, self.reference = evidence, paper, reference
        self.findings: list[Finding] = []
        self.warnings: list[str] = []
        self.context: list[str] = []

    def check(self) -> None:
        """Runs the study's rules: each adds findings, warnings and context lines."""
        raise NotImplementedError

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
