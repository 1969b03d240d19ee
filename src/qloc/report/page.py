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
from importlib import resources
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, QlocError
from ..runs.outputs import check_output_file, write_text
from ..studies.edit_protocol import CATASTROPHIC_DPPL
from ..studies.registry import Panel
from .captions import caption
from .claims import model_findings
from .explorer import explorer_run
from .findings import VERDICTS, ModelFindings, gather_evidence
from .format import escape, number_html, script_json
from .markdown import markdown_report
from .paper import PaperReference, load_paper_reference
from .sections import ROWS_SHOWN, RunSection, figures_of, panels_for, read_section, unit_counts

PAIRED_COLUMNS = 9
"""Tables with at most this many columns sit beside their figures; wider ones above them."""


# -- HTML ---------------------------------------------------------------------------------------


def _flagged(column: str, value: object) -> bool:
    """Cells that signal a broken setting: a perplexity change above 1 (perplexity more than doubled)."""
    perplexity_change = column.startswith("dppl") and not column.endswith("_std")
    return perplexity_change and isinstance(value, float) and value > CATASTROPHIC_DPPL


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values):
            if isinstance(value, str):
                cells.append(f"<td class='text'>{escape(value)}</td>")
            elif _flagged(str(column), value):
                cells.append(
                    f"<td class='flag' title='perplexity more than doubled: a broken edit'>"
                    f"{number_html(value)}</td>"
                )
            else:
                cells.append(f"<td>{number_html(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<div class='table'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _download(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<a download="{escape(name)}.csv" href="data:text/csv;base64,{encoded}">{escape(name)}.csv</a>'


def _panel_html(section: RunSection, panel: Panel, key: str, anchor: str) -> str:
    frames = {n: t.frame for n, t in section.tables.items()}
    tables = [section.tables[n] for n in panel.tables if n in section.tables]
    figures = figures_of(section, panel)
    text = caption(key, frames, panel)
    computed = any(t.computed for t in tables) or any(f.path is None for f in figures)
    if computed:
        text += (
            " Computed by qloc report from the store's KN sets (qloc consistency was not run into "
            "this directory)."
        )
    parts = [f"<div class='result' id='{anchor}'><h3>{escape(panel.title)}</h3>"]
    if text:
        parts.append(f"<p class='caption'>{escape(text)}</p>")
    body = []
    if tables:
        blocks = []
        for table in tables:
            shown = table.frame.head(ROWS_SHOWN)
            more = (
                f"first {ROWS_SHOWN} of {len(table.frame):,} rows; " if len(table.frame) > ROWS_SHOWN else ""
            )
            blocks.append(
                _html_table(shown) + f"<p class='note'>{more}CSV: {_download(table.name, table.csv)}</p>"
            )
        body.append("<div class='tables'>" + "".join(blocks) + "</div>")
    if figures:
        images = []
        for figure in figures:
            encoded = base64.b64encode(figure.png).decode()
            source = figure.path.name if figure.path else "drawn from the store"
            images.append(
                f"<figure><img alt='{escape(panel.title)}' src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{escape(figure.name)} ({escape(source)})</figcaption></figure>"
            )
        body.append("<div class='figures'>" + "".join(images) + "</div>")
    # A narrow table sits beside its figures; a wide one gets the page's width, its figures below it.
    narrow = all(len(t.frame.columns) <= PAIRED_COLUMNS for t in tables)
    layout = "panel pair" if tables and figures and narrow else "panel stack"
    parts.append(f"<div class='{layout}'>{''.join(body)}</div></div>")
    return "\n".join(parts)


def _environment_html(section: RunSection) -> str:
    if not section.environment:
        return ""
    model = section.environment.get("model", {})
    versions = section.environment.get("versions", {})
    text = (
        f"model {model.get('model')} ({model.get('family')}, {model.get('num_layers')} layers, d_ff "
        f"{model.get('d_ff')}, {model.get('dtype')} on {model.get('device')}); "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        + f"; {section.environment.get('platform')}; GPU: {section.environment.get('gpu') or 'none'}"
    )
    return f"<p class='note'>{escape(text)}</p>"


def _stages_html(section: RunSection) -> str:
    items = []
    for stage in section.stages:
        created = datetime.fromtimestamp(stage["created"], UTC).strftime("%Y-%m-%d %H:%M UTC")
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(stage["params"].items()))
        items.append(
            f"<li><b>{escape(stage['stage'])}</b> <span class='note'>(started {created})</span>: "
            f"<code>{escape(params)}</code></li>"
        )
    if not items:
        return ""
    return (
        f"<details><summary>Stages and their parameters ({len(items)})</summary>"
        f"<ul>{''.join(items)}</ul></details>"
    )


# -- findings -------------------------------------------------------------------------------------


def _findings_html(results: list[ModelFindings], paper: PaperReference) -> str:
    parts = [
        "<section id='glance'><h2>At a glance: what the runs found, beside the paper</h2>",
        "<p class='caption'>One table per model. Each row is a measurement of a claim of the paper "
        f"({escape(paper.paper)}); the paper's number is its cell in the table named for the paper's model "
        "closest in size, with the range of that cell over the paper's three models beside it. ✓: qloc's "
        "number goes the paper's way; ✗: it does not; –: no call (the reason is given; always where the "
        "paper prints no number to compare with); ⚠: the number signals a broken setting.</p>",
    ]
    for result in results:
        parts.append(
            f"<h3>{escape(result.model)} <span class='note'>compared with {escape(result.reference)}"
            f" ({escape(result.reference_reason)})</span></h3>"
        )
        for line in result.context:
            parts.append(f"<p class='context'>{escape(line)}</p>")
        if result.warnings:
            parts.append(
                "<ul class='warnings'>"
                + "".join(f"<li>⚠ {escape(w)}</li>" for w in result.warnings)
                + "</ul>"
            )
        rows, previous = [], None
        for finding in result.findings:
            claim_cell = ""
            if finding.claim != previous:
                span = sum(1 for f in result.findings if f.claim == finding.claim)
                claim_cell = (
                    f"<td rowspan='{span}' class='claim'><b>{escape(paper.where(finding.claim))}"
                    f"</b><br>{escape(paper.text(finding.claim))}</td>"
                )
                previous = finding.claim
            rows.append(
                f"<tr class='{finding.verdict}'>{claim_cell}<td class='text'>{escape(finding.measure)}</td>"
                f"<td class='text'>{escape(finding.measured)}</td><td class='text'>"
                f"{escape(finding.paper)}</td><td class='verdict'>{escape(VERDICTS[finding.verdict])}"
                f"</td><td class='text'>{escape(finding.note)}</td></tr>"
            )
        if rows:
            parts.append(
                "<div class='table'><table class='glance'><thead><tr><th>paper's claim</th><th>measure</th>"
                f"<th>qloc</th><th>paper ({escape(result.reference)})</th><th>direction</th><th>why</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            )
    parts.append("</section>")
    return "\n".join(parts)


# -- the page -------------------------------------------------------------------------------------


def _asset(name: str) -> str:
    return (resources.files("qloc.report") / "assets" / name).read_text(encoding="utf-8")


def _explorer_html(sections: list[RunSection]) -> tuple[str, int]:
    """The explorer's section and the size of its embedded data in bytes (0 where no run has KN sets)."""
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
        return "", 0
    data = script_json({"runs": runs})
    facts = sum(len(r["facts"]) for r in runs)
    return (
        "<section id='explorer'><h2>Fact explorer</h2><p class='caption'>"
        f"Pick a fact ({facts:,} in all; type to search by id, relation, answer or prompt) to see its "
        "queries with the model's probability and rank of the answer, each query's KN set as a strip over "
        "layers and neurons (the paper's Figure 1), the query-by-query overlap of the KN sets (Jaccard "
        "index; CS summarises it), the fact's CS and class, its CAS set, its edits and, where the synapse "
        "experiment ran, its knowledge synapses and KN activations (Figure 5). Everything is embedded in "
        "this file: it works offline.</p>"
        "<div id='qloc-explorer'></div>"
        f"<script type='application/json' id='qloc-explorer-data'>{data}</script>"
        f"<script>{_asset('explorer.js')}</script></section>"
    ), len(data.encode())


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
    models = ", ".join(r.model for r in results) or ", ".join(s.directory.name for s in sections)
    explorer, _ = _explorer_html(sections)
    toc = ["<li><a href='#glance'>At a glance</a></li>"]
    body = []
    for k, section in enumerate(sections):
        panels = panels_for(section)
        toc.append(
            f"<li><a href='#run-{k}'>{escape(str(section.directory))}</a>: "
            f"{len(section.tables)} tables, {len(section.figures)} figures<ul>"
            + "".join(
                f"<li><a href='#run-{k}-{j}'>{escape(p.title)}</a></li>" for j, (p, _) in enumerate(panels)
            )
            + "</ul></li>"
        )
        body.append(
            f"<section><h2 id='run-{k}'>Tables and figures: {escape(str(section.directory))}</h2>"
            + "".join(_panel_html(section, p, key, f"run-{k}-{j}") for j, (p, key) in enumerate(panels))
            + "</section>"
        )
    if explorer:
        toc.append("<li><a href='#explorer'>Fact explorer</a></li>")
    toc.append("<li><a href='#runs'>Runs: stages, parameters, environment</a></li>")
    runs = ["<section id='runs'><h2>Runs</h2>"]
    for section in sections:
        runs.append(f"<h3>{escape(str(section.directory))}</h3>" + _environment_html(section))
        if section.units is not None and not section.units.empty:
            runs.append(
                "<p class='caption'>Units (facts, or sequential runs) done and skipped per stage, with the "
                "reasons for skips.</p>" + _html_table(unit_counts(section.units))
            )
        runs.append(_stages_html(section))
    runs.append("</section>")
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>qloc report: {escape(models)}</title><style>{_asset('report.css')}</style></head><body>"
        f"<h1>qloc report: {escape(models)}</h1><p class='note'>Made {made} from {len(sections)} "
        f"director{'y' if len(sections) == 1 else 'ies'}. It reproduces {escape(paper.paper)}; qloc's "
        "docs/METHODS.md defines every number.</p>"
        f"<nav><ul>{''.join(toc)}</ul></nav>{_findings_html(results, paper)}{''.join(body)}{explorer}"
        f"{''.join(runs)}</body></html>\n"
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
