"""One self-contained report of a study (``qloc report``): an HTML file that opens from disk with no
network and no server, and the same tables as Markdown beside it (:mod:`qloc.report.markdown`).

The page reads as the study's front page: first what each model's run found, claim by claim beside
the paper (:mod:`qloc.report.findings`); then every table beside its figure in the paper's order,
each with a caption that says what is measured and how to read it (:mod:`qloc.report.sections`,
:mod:`qloc.report.captions`); then a per-fact explorer (:mod:`qloc.report.explorer`, drawn by
``assets/explorer.js``); last, each run's stages, parameters, environment and skip counts.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import webbrowser
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, QlocError
from ..runs.outputs import check_output_file, write_text
from ..studies.claims import VERDICTS
from ..studies.edit_measures import CATASTROPHIC_DPPL
from ..studies.paper import PaperReference, load_paper_reference
from ..studies.registry import Panel
from .captions import caption
from .explorer import explorer_run
from .findings import ModelFindings, gather_evidence, model_findings
from .markdown import markdown_report
from .render import asset, embedded_json, render_page
from .sections import ROWS_SHOWN, RunSection, figures_of, panels_for, read_section, unit_counts

PAIRED_COLUMNS = 9
"""Tables with at most this many columns sit beside their figures; wider ones above them."""


# -- what the page shows (its structure is templates/report.html.j2) ---------------------------


def _flagged(column: str, value: object) -> bool:
    """Cells that signal a broken setting: a perplexity change above 1 (perplexity more than doubled)."""
    perplexity_change = column.startswith("dppl") and not column.endswith("_std")
    return perplexity_change and isinstance(value, float) and value > CATASTROPHIC_DPPL


def _table(frame: pd.DataFrame) -> dict:
    """``frame``'s header and cells, each cell with its kind: ``text`` (a string), ``flag`` (a number
    that signals a broken setting) or ``number``."""
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values):
            kind = "text" if isinstance(value, str) else "flag" if _flagged(str(column), value) else "number"
            cells.append({"kind": kind, "value": value})
        rows.append(cells)
    return {"columns": [str(c) for c in frame.columns], "rows": rows}


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _panel(section: RunSection, panel: Panel, key: str, anchor: str) -> dict:
    """One panel: its caption, its tables (the first rows, each with its whole CSV) and its figures."""
    frames = {n: t.frame for n, t in section.tables.items()}
    tables = [section.tables[n] for n in panel.tables if n in section.tables]
    figures = figures_of(section, panel)
    text = caption(key, frames, panel)
    if any(t.computed for t in tables) or any(f.path is None for f in figures):
        text += (
            " Computed by qloc report from the store's KN sets (qloc consistency was not run into "
            "this directory)."
        )
    # A narrow table sits beside its figures; a wide one gets the page's width, its figures below it.
    narrow = all(len(t.frame.columns) <= PAIRED_COLUMNS for t in tables)
    return {
        "anchor": anchor,
        "title": panel.title,
        "caption": text,
        "layout": "panel pair" if tables and figures and narrow else "panel stack",
        "tables": [
            {
                "table": _table(t.frame.head(ROWS_SHOWN)),
                "more": f"first {ROWS_SHOWN} of {len(t.frame):,} rows; " if len(t.frame) > ROWS_SHOWN else "",
                "name": t.name,
                "csv": _base64(t.csv),
            }
            for t in tables
        ],
        "figures": [
            {
                "png": _base64(f.png),
                "name": f.name,
                "source": f.path.name if f.path else "drawn from the store",
            }
            for f in figures
        ],
    }


def _environment_text(section: RunSection) -> str:
    if not section.environment:
        return ""
    model = section.environment.get("model", {})
    versions = section.environment.get("versions", {})
    return (
        f"model {model.get('model')} ({model.get('family')}, {model.get('num_layers')} layers, d_ff "
        f"{model.get('d_ff')}, {model.get('dtype')} on {model.get('device')}); "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        + f"; {section.environment.get('platform')}; GPU: {section.environment.get('gpu') or 'none'}"
    )


def _stages(section: RunSection) -> list[dict]:
    return [
        {
            "stage": stage["stage"],
            "created": datetime.fromtimestamp(stage["created"], UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "params": ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(stage["params"].items())),
        }
        for stage in section.stages
    ]


def _run(k: int, section: RunSection) -> dict:
    """One directory: its panels (anchored ``run-K-J``) and what the Runs section says of it."""
    units = section.units
    return {
        "anchor": f"run-{k}",
        "directory": str(section.directory),
        "tables": len(section.tables),
        "figures": len(section.figures),
        "panels": [_panel(section, p, key, f"run-{k}-{j}") for j, (p, key) in enumerate(panels_for(section))],
        "environment": _environment_text(section),
        "units": _table(unit_counts(units)) if units is not None and not units.empty else None,
        "stages": _stages(section),
    }


def _glance(result: ModelFindings, paper: PaperReference) -> dict:
    """One model's findings as rows; a claim's text in the first of its rows, spanning them all."""
    rows, previous = [], None
    for finding in result.findings:
        claim = None
        if finding.claim != previous:
            claim = {
                "span": sum(1 for f in result.findings if f.claim == finding.claim),
                "where": paper.where(finding.claim),
                "text": paper.text(finding.claim),
            }
            previous = finding.claim
        rows.append({"finding": finding, "verdict": VERDICTS[finding.verdict], "claim": claim})
    return {"result": result, "rows": rows}


def _explorer(sections: list[RunSection]) -> dict | None:
    """The explorer's data (every run with KN sets) and its fact count; None where no run has KN sets."""
    runs = []
    for section in sections:
        if "kn_sets" not in section.store or section.store["kn_sets"].empty:
            continue
        model = section.environment.get("model", {})
        shape = (
            (model["num_layers"], model["d_ff"]) if model.get("num_layers") and model.get("d_ff") else None
        )
        runs.append(
            explorer_run(
                str(section.directory), section.model or section.directory.name, section.store, shape
            )
        )
    if not runs:
        return None
    return {
        "facts": f"{sum(len(r['facts']) for r in runs):,}",
        "data": embedded_json({"runs": runs}),
        "script": asset("explorer.js"),
    }


# -- the page -------------------------------------------------------------------------------------


def write_report(run_dirs: list[Path], out: Path, paper_reference: Path | None = None) -> dict[str, Path]:
    """``out`` (HTML) and ``out`` with suffix ``.md`` (findings and tables as Markdown)."""
    if not run_dirs:
        raise ConfigError(lambda name: f"no run directory given: give at least one with {name('run_dirs')}")
    out, md = Path(out), Path(out).with_suffix(".md")
    if out == md:
        raise QlocError(f"report {str(out)!r}: the HTML file cannot end in .md, where its Markdown goes")
    check_output_file(out, "the report")
    check_output_file(md, "the report's Markdown")
    paper = load_paper_reference(paper_reference)
    sections = [read_section(Path(d)) for d in run_dirs]
    results = [model_findings(e, paper) for e in gather_evidence(sections)]
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = render_page(
        models=", ".join(r.model for r in results) or ", ".join(s.directory.name for s in sections),
        made=made,
        directories=f"{len(sections)} director{'y' if len(sections) == 1 else 'ies'}",
        paper=paper.paper,
        css=asset("report.css"),
        glance=[_glance(r, paper) for r in results],
        runs=[_run(k, s) for k, s in enumerate(sections)],
        explorer=_explorer(sections),
    )
    write_text(out, page)
    write_text(md, markdown_report(sections, results, paper, made, md))
    return {"html": out, "markdown": md}


def open_in_browser(page: Path) -> bool:
    """Open ``page`` in the default browser; False where there is no display (Linux without X11
    or Wayland: a text browser would take over the terminal) or no browser."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False
    try:
        return webbrowser.open(Path(page).resolve().as_uri())
    except webbrowser.Error:
        return False
