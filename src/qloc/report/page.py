"""One self-contained report of a study (``qloc report``): an HTML file that opens from disk with no
network and no server, and the same tables as Markdown beside it.

The page reads as the study's front page: first what each model's run found, claim by claim beside
the paper (:mod:`qloc.report_findings`); then every table beside its figure in the paper's order,
each with a caption that says what is measured and how to read it; then a per-fact explorer
(:mod:`qloc.report_explorer`, drawn by ``report_assets/explorer.js``); last, each run's stages,
parameters, environment and skip counts.

A directory is read as the commands left it: ``tables/*.csv`` and ``figures/*.png`` (written by
:mod:`qloc.outputs`) and, where it is a run directory, its store. A run directory whose KN
consistency was not computed into it gets Table 1 and Figures 3/7/8/9 computed from its store's
KN sets, in memory (nothing is written into the run).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import webbrowser
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import QlocError
from ..runs.outputs import check_writable
from ..runs.store import STORE_FILE, RunStore
from ..studies.consistency import model_label
from .explorer import explorer_run
from .findings import (
    VERDICTS,
    Evidence,
    ModelFindings,
    PaperReference,
    load_paper_reference,
    model_findings,
)
from .format import escape, format_number, number_html, script_json

if TYPE_CHECKING:
    import matplotlib.figure

ROWS_SHOWN = 40
"""Longer tables show their first rows; the whole CSV is embedded as a download link."""
STORE_TABLES = ("kn_sets", "cas_sets", "edits", "mapping", "synapses", "synapse_effects")
"""Store tables the findings and the explorer read."""
FIGURE_DPI = 110
PAIRED_COLUMNS = 9
"""Tables with at most this many columns sit beside their figures; wider ones above them."""


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    csv: bytes
    computed: bool = False
    """True where the report computed it from the store (no such file in the directory)."""


@dataclass
class Figure:
    name: str
    png: bytes
    path: Path | None = None
    """The PNG file; None where the report drew the figure from the store."""


@dataclass
class RunSection:
    directory: Path
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    units: pd.DataFrame | None = None
    store: dict[str, pd.DataFrame] = field(default_factory=dict)
    model: str | None = None
    """The run's model as Table 1 names it (a path's last part), where the directory is a run."""


def read_section(directory: Path) -> RunSection:
    directory = Path(directory)
    if not directory.is_dir():
        raise QlocError(f"--run-dir {str(directory)!r} is not a directory")
    section = RunSection(directory)
    for csv in sorted((directory / "tables").glob("*.csv")):
        try:
            section.tables[csv.stem] = Table(csv.stem, pd.read_csv(csv), csv.read_bytes())
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise QlocError(f"table {str(csv)!r} cannot be read: {exc}") from None
    for png in sorted((directory / "figures").glob("*.png")):
        section.figures[png.stem] = Figure(png.stem, png.read_bytes(), png)
    if (directory / STORE_FILE).is_file():
        with RunStore.open_existing(directory) as store:
            section.stages, section.units = store.stages(), store.units()
            present = set(store.tables())
            section.store = {name: store.frame(name) for name in STORE_TABLES if name in present}
            stages = {s["stage"]: s["params"] for s in section.stages}
            if "localize" in stages:
                section.model = model_label(stages["localize"]["model"])
        section.environment = section.stages[-1]["environment"] if section.stages else {}
    if not (section.tables or section.figures or section.stages):
        raise QlocError(f"{str(directory)!r} has no qloc tables, figures or run store")
    if "table1" not in section.tables and "kn_sets" in section.store and section.model:
        _add_consistency(section)
    return section


def _png(fig: matplotlib.figure.Figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return buffer.getvalue()


def _add_consistency(section: RunSection) -> None:
    """Table 1 (with its chance baseline), the per-fact scores and Figures 3/7/8/9 from the store's
    KN sets, as ``qloc consistency`` would write them for this one run."""
    from ..studies.consistency import consistency_study, load_kn_sets

    study = consistency_study(load_kn_sets([section.directory]).assign(model=section.model))
    computed = {"table1": study.table1, "consistency": study.per_fact(), "fig9_ki_share": study.curve}
    for method in study.methods:
        computed[f"relations_{method}"] = study.relations(method)
        section.figures[f"violin_{method}"] = Figure(f"violin_{method}", _png(study.violin(method)))
    section.figures["fig9_threshold"] = Figure("fig9_threshold", _png(study.threshold_figure()))
    for name, frame in computed.items():
        if name not in section.tables:
            section.tables[name] = Table(name, frame, frame.to_csv(index=False).encode(), computed=True)


def unit_counts(units: pd.DataFrame) -> pd.DataFrame:
    """Per stage: units done and skipped, and each skip reason's count (its kind, before ':')."""
    rows = []
    for stage, group in units.groupby("stage", sort=False):
        skipped = group[group.status == "skipped"]
        reasons = Counter(str(r).split(":")[0] for r in skipped["reason"])
        rows.append(
            {
                "stage": stage,
                "done": int((group.status == "done").sum()),
                "skipped": len(skipped),
                "skip reasons": "; ".join(f"{n} {k}" for k, n in reasons.most_common()) or "-",
                "seconds (sum)": round(float(group.seconds.fillna(0).sum()), 1),
            }
        )
    return pd.DataFrame(rows)


# -- panels: a table beside its figure, in the paper's order ------------------------------------


def _count(frame: pd.DataFrame, column: str) -> str:
    """The values of a count column as text: ``31``, or ``20-200`` where rows differ."""
    if column not in frame or frame[column].dropna().empty:
        return "?"
    low, high = int(frame[column].min()), int(frame[column].max())
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


EDIT_READING = (
    "Rel: the edit works on the edited query; Gen: on the fact's other queries; Loc: 10 unrelated "
    "queries keep their answers; Avg: their mean (all 0-1, higher is better). dPPL: relative change "
    "of WikiText-2 perplexity (0 unchanged, 1 doubled); cells above 1 are marked: such an edit "
    "broke the model."
)


def _caption_table1(t: dict[str, pd.DataFrame]) -> str:
    frame = t["table1"]
    chance = (
        " cs_null_mean / cs_null_p95: mean and 95th percentile of CS for groups of queries drawn from "
        "different facts (chance); R_above_null: share of facts above it."
        if "cs_null_p95" in frame
        else ""
    )
    return (
        f"KN consistency over {_count(frame, 'facts')} facts per model and method. R_KI / R_KC: share of "
        "facts (0-1) that are inconsistent / consistent; CS_KI / CS_KC: their mean consistency score (share "
        "of a fact's KN union held by two or more of its queries, 0-1); t, p: Welch's t-test of KC against "
        "KI; U_KI: share of facts every method classes KI; empty_union: facts without any KN. KC means "
        "CS >= the threshold: static 0.1, or Otsu's per run." + chance
    )


def _caption_relations(t: dict[str, pd.DataFrame], method: str) -> str:
    frame = t.get(f"relations_{method}")
    size = f" {int(frame['facts'].sum()):,} facts in {len(frame):,} relations." if frame is not None else ""
    return (
        f"CS of every fact per relation, {method.upper()} KN sets (dots: facts; red line: the static "
        f"threshold 0.1). Relations whose facts sit low are KI.{size} Columns: facts, mean and median CS, "
        "share of KI facts."
    )


def _caption_fig9(t: dict[str, pd.DataFrame]) -> str:
    return (
        "Share of KI facts (0-1) as the static threshold runs from 0.04 to 0.80, one curve per model and "
        "method. A curve that rises early means most facts have a low CS."
    )


def _caption_sensitivity(t: dict[str, pd.DataFrame]) -> str:
    return (
        "KI shares and CS_KC per KN rule (t = KNs score at least t x the top score; topN = the N best "
        "neurons) with the chance baseline: whether the KI share depends on how KN sets are cut."
    )


def _caption_table2(t: dict[str, pd.DataFrame]) -> str:
    frame = t["table2"]
    return (
        f"Erasing each fact's answer, or updating it to another object of the relation, through one query's "
        f"KN set (Self) or the union of all its queries' sets (Union); {_count(frame, 'facts')} facts per "
        f"row, split into KC and KI facts. {EDIT_READING}"
    )


def _caption_table3(t: dict[str, pd.DataFrame]) -> str:
    frame = t["table3"]
    return (
        f"Table 2 with Consistency-Aware KN selection (CAS: neurons scoring high and alike across the fact's "
        f"queries); {_count(frame, 'facts')} facts per row. {EDIT_READING}"
    )


def _caption_fig4(t: dict[str, pd.DataFrame]) -> str:
    frame = t["fig4_mapping"]
    return (
        "Relative change of the answer's probability (dProb: -1 = gone, 1 = doubled) when neurons of a query "
        "are suppressed (x0) or enhanced (x2): its own KNs (Self), the union, intersection or refined set "
        "(in two or more) of its neighbour queries' KNs, and as many unrelated neurons; "
        f"{_count(frame, 'queries')} queries per row. Under query localization Self moves the answer most."
    )


def _caption_fig6(t: dict[str, pd.DataFrame], name: str) -> str:
    frame = t[name]
    measure = "mean |activation|" if name.endswith("magnitude") else "mean activation"
    return (
        "Suppressing (x0) or enhancing (x2) each query's knowledge synapses (attention probabilities "
        f"with an IG score >= 0.3 x the top one; {format_number(frame['synapses_mean'].max())} per query "
        f"on average): relative change of the {measure} of the query's KNs, of neighbour queries' KNs, of "
        f"random non-KNs, and of P(answer); {_count(frame, 'queries')} queries. Means of ratios explode "
        "where a mean is near 0: read the medians. Figure 11 shows their distributions."
    )


def _caption_heatmaps(t: dict[str, pd.DataFrame]) -> str:
    return (
        "KN activations of one fact (columns: its KNs by layer; rows: its queries) with no manipulation, "
        "with the query's knowledge synapses suppressed, and enhanced. The fact explorer below draws this "
        "for every fact the synapse experiment ran on."
    )


def _caption_table6(t: dict[str, pd.DataFrame]) -> str:
    return (
        "Wall time (s) and peak memory (MB; CPU: growth of resident memory, CUDA: allocated memory) of "
        "one forward pass with no, suppressed and enhanced synapses; "
        f"{_count(t['table6_cost'], 'passes')} passes."
    )


def _caption_table7(t: dict[str, pd.DataFrame]) -> str:
    frame = t["table7"]
    return (
        f"Sequential editing: {_count(frame, 'facts')} facts updated one after another without restoring "
        f"the weights, everything measured at the end; mean and std over {_count(frame, 'seeds')} seeds. "
        "Rel, Gen, Loc, Avg 0-1; dPPL relative perplexity change."
    )


def _caption_table8(t: dict[str, pd.DataFrame]) -> str:
    return "Greedy continuations of the edited query and of a neighbour query before and after one edit."


def _caption_census(t: dict[str, pd.DataFrame]) -> str:
    return (
        "Per relation: share of queries and of facts whose answer the model ranks first (top-1) or in its "
        "top 10: how much of ParaRel the model knows."
    )


def _caption_consistency(t: dict[str, pd.DataFrame]) -> str:
    return (
        f"Per fact and method: CS (relaxed and strict), size of the KN union and the KC/KI classes; "
        f"{len(t['consistency']):,} rows. The fact explorer shows each fact's KN sets."
    )


@dataclass(frozen=True)
class Panel:
    title: str
    tables: tuple[str, ...]
    figures: tuple[str, ...]
    """Figure names; a name ending in ``*`` takes every figure starting with the rest."""
    caption: Callable[[dict[str, pd.DataFrame]], str]


def panels_for(section: RunSection) -> list[Panel]:
    """The section's panels in the paper's order (Table 1, Figures 3/7/8/9, Table 2, Table 3,
    Figure 4, Figures 6/11, Figures 5/10, Tables 6, 7, 8), then whatever else it holds."""
    names = set(section.tables) | set(section.figures)
    methods = list(
        dict.fromkeys(
            m.split("_", 1)[1]
            for m in sorted(names, key=_method_order)
            if re.fullmatch(r"(relations|violin)_\w+", m)
        )
    )
    ordered = [Panel("Table 1: KN consistency", ("table1",), (), _caption_table1)]
    ordered += [
        Panel(
            f"Figures 3/7/8: CS per relation ({m.upper()})",
            (f"relations_{m}",),
            (f"violin_{m}",),
            lambda t, m=m: _caption_relations(t, m),
        )
        for m in methods
    ]
    ordered += [
        Panel(
            "Figure 9: KI share as the threshold varies",
            ("fig9_ki_share",),
            ("fig9_threshold",),
            _caption_fig9,
        ),
        Panel(
            "KN-rule sensitivity of the KI share",
            ("threshold_sensitivity",),
            ("threshold_sensitivity",),
            _caption_sensitivity,
        ),
        Panel(
            "Table 2: knowledge modification through Self and Union KN sets", ("table2",), (), _caption_table2
        ),
        Panel(
            "Table 3: knowledge modification with Consistency-Aware KN selection",
            ("table3",),
            (),
            _caption_table3,
        ),
        Panel("Figure 4: query-KN mapping", ("fig4_mapping",), ("fig4_mapping",), _caption_fig4),
        Panel(
            "Figures 6/11: knowledge synapses and KN activations",
            ("fig6_synapses",),
            ("fig6_synapses", "fig11_dkn_distributions"),
            lambda t: _caption_fig6(t, "fig6_synapses"),
        ),
        Panel(
            "Figures 6/11 with dKN of mean |activation|",
            ("fig6_synapses_magnitude",),
            ("fig6_synapses_magnitude", "fig11_dkn_distributions_magnitude"),
            lambda t: _caption_fig6(t, "fig6_synapses_magnitude"),
        ),
        Panel(
            "Figures 5/10: KN activations of neighbour queries, none / KS suppressed / KS enhanced",
            (),
            ("fig5_heatmap", "fig10_heatmap_*"),
            _caption_heatmaps,
        ),
        Panel("Table 6: cost of suppressing and enhancing synapses", ("table6_cost",), (), _caption_table6),
        Panel("Table 7: sequential editing", ("table7",), (), _caption_table7),
        Panel("Table 8: case study", ("table8",), (), _caption_table8),
        Panel("What the model knows, per relation", ("census_relations",), (), _caption_census),
        Panel("KN consistency per fact", ("consistency",), (), _caption_consistency),
    ]
    chosen = [p for p in ordered if any(t in section.tables for t in p.tables) or _figures_of(section, p)]
    used = {t for p in chosen for t in p.tables} | {f.name for p in chosen for f in _figures_of(section, p)}
    for name in sorted(names - used, key=_method_order):
        title = name.replace("_", " ")
        chosen.append(
            Panel(
                title,
                (name,) if name in section.tables else (),
                (name,) if name in section.figures else (),
                lambda t: "",
            )
        )
    return chosen


def _method_order(name: str) -> tuple:
    """IG, AMIG, SIG first in that order (the paper's), then by name."""
    order = {"ig": 0, "amig": 1, "sig": 2}
    return (order.get(name.rsplit("_", 1)[-1], 9), name)


def _figures_of(section: RunSection, panel: Panel) -> list[Figure]:
    found = []
    for pattern in panel.figures:
        if pattern.endswith("*"):
            found += [f for n, f in sorted(section.figures.items()) if n.startswith(pattern[:-1])]
        elif pattern in section.figures:
            found.append(section.figures[pattern])
    return found


# -- HTML ---------------------------------------------------------------------------------------


def _flagged(column: str, value: object) -> bool:
    """Cells that signal a broken setting: a perplexity change above 1 (perplexity more than doubled)."""
    return (
        column.startswith("dppl") and not column.endswith("_std") and isinstance(value, float) and value > 1
    )


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


def _panel_html(section: RunSection, panel: Panel, anchor: str) -> str:
    frames = {n: t.frame for n, t in section.tables.items()}
    tables = [section.tables[n] for n in panel.tables if n in section.tables]
    figures = _figures_of(section, panel)
    caption = panel.caption(frames)
    computed = any(t.computed for t in tables) or any(f.path is None for f in figures)
    if computed:
        caption += (
            " Computed by qloc report from the store's KN sets (qloc consistency was not run into "
            "this directory)."
        )
    parts = [f"<div class='result' id='{anchor}'><h3>{escape(panel.title)}</h3>"]
    if caption:
        parts.append(f"<p class='caption'>{escape(caption)}</p>")
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


_CONSISTENCY_TABLES = {"consistency", "fig9_ki_share", "threshold_sensitivity"} | {
    f"relations_{m}" for m in ("ig", "amig", "sig")
}


def _findings_html(results: list[ModelFindings], paper: PaperReference) -> str:
    parts = [
        "<section id='glance'><h2>At a glance: what the runs found, beside the paper</h2>",
        "<p class='caption'>One table per model. Each row is a measurement of a claim of the paper "
        f"({escape(paper.paper)}); the paper's number is from the table named, for the paper's model "
        "closest in size. ✓: qloc's result goes the paper's way; ✗: it does not; –: no call can be made "
        "(the reason is given); ⚠: the number signals a broken setting. Values the paper reference file does "
        "not hold are marked 'not transcribed'.</p>",
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


def _findings_markdown(results: list[ModelFindings], paper: PaperReference) -> str:
    lines = [
        "## At a glance\n",
        f"Claims of {paper.paper}; the paper's numbers are for its model closest in size.\n",
    ]
    for result in results:
        lines.append(f"### {result.model} (compared with {result.reference}: {result.reference_reason})\n")
        lines += [f"{line}\n" for line in result.context]
        lines += [f"- WARNING: {w}" for w in result.warnings]
        if result.warnings:
            lines.append("")
        if result.findings:
            lines.append("| where | measure | qloc | paper | direction | why |")
            lines.append("|---|---|---|---|---|---|")
            for f in result.findings:
                cells = [paper.where(f.claim), f.measure, f.measured, f.paper, VERDICTS[f.verdict], f.note]
                lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


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
        raise QlocError("give at least one --run-dir")
    out = Path(out)
    check_writable(out.parent, "the report")
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
            + "".join(f"<li><a href='#run-{k}-{j}'>{escape(p.title)}</a></li>" for j, p in enumerate(panels))
            + "</ul></li>"
        )
        body.append(
            f"<section><h2 id='run-{k}'>Tables and figures: {escape(str(section.directory))}</h2>"
            + "".join(_panel_html(section, p, f"run-{k}-{j}") for j, p in enumerate(panels))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(_markdown(sections, results, paper, made, md), encoding="utf-8")
    return {"html": out, "markdown": md}


def _markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(format_number(v).replace("|", "/") for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def _markdown(
    sections: list[RunSection], results: list[ModelFindings], paper: PaperReference, made: str, md: Path
) -> str:
    parts = [
        f"# qloc report\n\nMade {made}. The HTML report beside this file also holds the fact explorer.\n",
        _findings_markdown(results, paper),
    ]
    for section in sections:
        parts.append(f"## {section.directory}\n")
        for panel in panels_for(section):
            frames = {n: t.frame for n, t in section.tables.items()}
            parts.append(f"### {panel.title}\n")
            if caption := panel.caption(frames):
                parts.append(f"{caption}\n")
            for name in panel.tables:
                if name in section.tables:
                    frame = section.tables[name].frame
                    more = (
                        f"\n\n(first {ROWS_SHOWN} of {len(frame):,} rows)" if len(frame) > ROWS_SHOWN else ""
                    )
                    parts.append(_markdown_table(frame.head(ROWS_SHOWN)) + more + "\n")
            for figure in _figures_of(section, panel):
                if figure.path is not None:
                    link = Path(os.path.relpath(figure.path.resolve(), md.parent.resolve())).as_posix()
                    parts.append(f"![{panel.title}]({link})\n")
        if section.units is not None and not section.units.empty:
            parts.append(
                "### Units done and skipped\n\n" + _markdown_table(unit_counts(section.units)) + "\n"
            )
    return "\n".join(parts)


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
