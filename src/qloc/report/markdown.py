"""The report's Markdown: the findings and every table (with links to the figures), beside the HTML."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..numbers import format_number
from ..runs.outputs import markdown_text
from ..studies.claims import VERDICTS
from ..studies.paper import PaperReference
from .captions import caption
from .findings import ModelFindings
from .sections import ROWS_SHOWN, RunSection, figures_of, panels_for, unit_counts


def findings_markdown(results: list[ModelFindings], paper: PaperReference) -> str:
    lines = [
        "## At a glance\n",
        f"Claims of {paper.paper}; the paper's numbers are for its model closest in size.\n",
    ]
    for result in results:
        heading = f"{result.model} (compared with {result.reference}: {result.reference_reason})"
        lines.append(f"### {markdown_text(heading)}\n")
        lines += [f"{markdown_text(line)}\n" for line in result.context]
        lines += [f"- WARNING: {markdown_text(w)}" for w in result.warnings]
        if result.warnings:
            lines.append("")
        if result.findings:
            lines.append("| where | measure | qloc | paper | direction | why |")
            lines.append("|---|---|---|---|---|---|")
            for f in result.findings:
                cells = [paper.where(f.claim), f.measure, f.measured, f.paper, VERDICTS[f.verdict], f.note]
                lines.append("| " + " | ".join(map(markdown_text, cells)) + " |")
            lines.append("")
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table, numbers as the report writes them and data escaped."""
    lines = ["| " + " | ".join(map(markdown_text, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(markdown_text(format_number(v)) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def markdown_report(
    sections: list[RunSection], results: list[ModelFindings], paper: PaperReference, made: str, md: Path
) -> str:
    parts = [
        f"# qloc report\n\nMade {made}. The HTML report beside this file also holds the fact explorer.\n",
        findings_markdown(results, paper),
    ]
    for section in sections:
        parts.append(f"## {markdown_text(section.directory)}\n")
        for panel, key in panels_for(section):
            frames = {n: t.frame for n, t in section.tables.items()}
            parts.append(f"### {panel.title}\n")
            if text := caption(key, frames, panel):
                parts.append(f"{text}\n")
            for name in panel.tables:
                if name in section.tables:
                    frame = section.tables[name].frame
                    more = (
                        f"\n\n(first {ROWS_SHOWN} of {len(frame):,} rows)" if len(frame) > ROWS_SHOWN else ""
                    )
                    parts.append(markdown_table(frame.head(ROWS_SHOWN)) + more + "\n")
            for figure in figures_of(section, panel):
                if figure.path is not None:
                    link = Path(os.path.relpath(figure.path.resolve(), md.parent.resolve())).as_posix()
                    parts.append(f"![{panel.title}]({link})\n")
        if section.units is not None and not section.units.empty:
            parts.append("### Units done and skipped\n\n" + markdown_table(unit_counts(section.units)) + "\n")
    return "\n".join(parts)
