"""The report's "at a glance" section: what a run found, claim by claim of the paper, beside the
paper's number for the closest model it reports, with a mark where qloc's result goes the paper's
way and where it does not, and words for numbers that signal a broken setting.

Each study declares the rules of its claims beside it (``claims`` of its registry entry, a
:class:`qloc.studies.claims.ClaimRules`); this module gathers one model's evidence from the
directories given, picks the paper's model to compare with, and runs every study's rules, in the
order of ``STUDIES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..numbers import format_number
from ..studies import STUDIES
from ..studies.claims import Evidence, Finding
from ..studies.paper import PaperReference
from .sections import RunSection

LARGE_MODEL = 1e9
LARGE_MLP_WIDTH = 8192
"""Where a model's name gives no size: MLP widths from this up count as large (GPT-2: 3,072;
LLaMA3-8b: 14,336)."""


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


def model_findings(evidence: Evidence, paper: PaperReference) -> ModelFindings:
    """Every finding of one model, its warnings and context lines: each study's claim rules in turn."""
    reference, reason = reference_model(evidence.model, evidence.d_ff, paper)
    context = [f"From {', '.join(evidence.sources)}."] if evidence.sources else []
    warnings: list[str] = []
    findings: list[Finding] = []
    for study in STUDIES:
        if study.claims is None:
            continue
        rules = study.claims(evidence, paper, reference)
        rules.check()
        context += rules.context
        warnings += rules.warnings
        findings += rules.findings
    return ModelFindings(evidence.model, reference, reason, context, warnings, findings)
