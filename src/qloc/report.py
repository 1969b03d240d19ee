"""One self-contained report of a study (``qloc report``): an HTML file with every table and
figure the run directories hold (figures embedded, no network, no server), each run's stages with
their parameters and environment, and counts of what was skipped and why; plus the same tables as
Markdown for papers.

A directory is read as the commands left it: ``tables/*.csv`` and ``figures/*.png`` (written by
:mod:`qloc.outputs`), and, where it is a run directory, its store's stages and units.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .errors import QlocError
from .outputs import check_writable, markdown_table
from .store import STORE_FILE, RunStore

ROWS_SHOWN = 40
"""Longer tables show their first rows; the whole CSV is embedded as a download link."""

TITLES = {
    "table1": "Table 1: KN consistency (KI/KC shares, CS, Welch's t-test, U_KI)",
    "consistency": "KN-consistency score per fact and method",
    "fig9_ki_share": "Figure 9 data: KI share by threshold",
    "table2": "Table 2: knowledge modification through Self and Union KN sets",
    "table3": "Table 3: knowledge modification with Consistency-Aware KN selection",
    "table7": "Table 7: sequential editing (mean and std over seeds)",
    "table8": "Table 8: case study, greedy continuations before and after the edit",
    "fig4_mapping": "Figure 4 data: query-KN mapping (dProb per KN set)",
    "fig6_synapses": "Figure 6 data: effect of suppressing / enhancing knowledge synapses",
    "table6_cost": "Table 6: time and peak memory with none / suppressed / enhanced synapses",
    "fig4_mapping_fig": "Figure 4: query-KN mapping",
    "fig5_heatmap": "Figure 5: KN activations of neighbour queries, none / KS suppressed / KS enhanced",
    "fig6_synapses_fig": "Figure 6: knowledge synapses and KN activations",
    "fig9_threshold": "Figure 9: KI share as the threshold varies",
    "fig11_dkn_distributions": "Figure 11: distributions of the KN activation change",
    "fig6_synapses_magnitude": "Figure 6 data, dKN of mean |activation|",
    "fig6_synapses_magnitude_fig": "Figure 6 with dKN of mean |activation|",
    "fig11_dkn_distributions_magnitude": "Figure 11 with dKN of mean |activation|",
}
PREFIX_TITLES = {
    "relations_": "CS per relation ({})",
    "violin_": "Figures 3/7/8: CS per relation ({})",
    "fig10_heatmap_": "Figure 10: KN activations of neighbour queries, example {}",
}


def title_for(name: str, kind: str) -> str:
    if kind == "figure" and f"{name}_fig" in TITLES:
        return TITLES[f"{name}_fig"]
    if name in TITLES:
        return TITLES[name]
    for prefix, template in PREFIX_TITLES.items():
        if name.startswith(prefix):
            return template.format(name.removeprefix(prefix))
    return name.replace("_", " ")


def _order(path: Path) -> tuple:
    """Paper order: by the number in table<N>/fig<N>, then by name."""
    match = re.match(r"(?:table|fig)(\d+)", path.stem)
    return (int(match.group(1)) if match else 99, path.stem)


@dataclass
class RunSection:
    directory: Path
    tables: list[tuple[Path, pd.DataFrame]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    units: pd.DataFrame | None = None


def read_section(directory: Path) -> RunSection:
    directory = Path(directory)
    if not directory.is_dir():
        raise QlocError(f"--run-dir {str(directory)!r} is not a directory")
    section = RunSection(directory)
    for csv in sorted((directory / "tables").glob("*.csv"), key=_order):
        try:
            section.tables.append((csv, pd.read_csv(csv)))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise QlocError(f"table {str(csv)!r} cannot be read: {exc}") from None
    section.figures = sorted((directory / "figures").glob("*.png"), key=_order)
    if (directory / STORE_FILE).is_file():
        with RunStore.open_existing(directory) as store:
            section.stages, section.units = store.stages(), store.units()
        section.environment = section.stages[-1]["environment"] if section.stages else {}
    if not (section.tables or section.figures or section.stages):
        raise QlocError(f"{str(directory)!r} has no qloc tables, figures or run store")
    return section


def unit_counts(units: pd.DataFrame) -> pd.DataFrame:
    """Per stage: units done and skipped, and each skip reason's count (its kind, before ':')."""
    rows = []
    for stage, group in units.groupby("stage", sort=False):
        reasons = Counter(str(r).split(":")[0] for r in group.loc[group.status == "skipped", "reason"])
        rows.append({"stage": stage, "done": int((group.status == "done").sum()), "skipped": int((group.status == "skipped").sum()),
                     "skip reasons": "; ".join(f"{n} {k}" for k, n in reasons.most_common()) or "-",
                     "seconds (sum)": round(float(group.seconds.fillna(0).sum()), 1)})
    return pd.DataFrame(rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.85em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
nav ul { columns: 2; font-size: 0.9em; } code { font-size: 0.8em; } details li { margin: 0.3em 0; }
"""

# Marks the page once every figure has decoded, so that a headless browser can check them.
_CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const shown = images.filter(img => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute('data-figures', images.length);
  document.body.setAttribute('data-figures-shown', shown);
});
"""


def _format(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)


def _html_table(frame: pd.DataFrame) -> str:
    return _format(frame).to_html(index=False, escape=True, border=0, na_rep="nan")


def _download(csv: Path) -> str:
    data = base64.b64encode(csv.read_bytes()).decode()
    return f'<a download="{html.escape(csv.name)}" href="data:text/csv;base64,{data}">{html.escape(csv.name)}</a>'


def _section_html(section: RunSection, anchor: str) -> str:
    parts = [f'<h2 id="{anchor}">{html.escape(str(section.directory))}</h2>']
    if section.environment:
        model = section.environment.get("model", {})
        versions = section.environment.get("versions", {})
        parts.append('<p class="note">' + html.escape(
            f"model {model.get('model')} ({model.get('family')}, {model.get('num_layers')} layers, d_ff {model.get('d_ff')}, "
            f"{model.get('dtype')} on {model.get('device')}); "
            + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f"; {section.environment.get('platform')}; "
            f"GPU: {section.environment.get('gpu') or 'none'}") + "</p>")
    if section.units is not None and not section.units.empty:
        parts.append("<h3>Units done and skipped</h3>" + _html_table(unit_counts(section.units)))
    for csv, frame in section.tables:
        shown = frame.head(ROWS_SHOWN)
        note = (f"first {ROWS_SHOWN} of {len(frame)} rows; " if len(frame) > ROWS_SHOWN else "") + f"CSV: {_download(csv)}"
        parts.append(f"<h3>{html.escape(title_for(csv.stem, 'table'))}</h3>{_html_table(shown)}<p class='note'>{note}</p>")
    for png in section.figures:
        data = base64.b64encode(png.read_bytes()).decode()
        caption = html.escape(title_for(png.stem, "figure"))
        parts.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{caption} ({html.escape(png.name)})</figcaption></figure>")
    if section.stages:
        items = []
        for stage in section.stages:
            created = datetime.fromtimestamp(stage["created"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(stage["params"].items()))
            items.append(f"<li><b>{html.escape(stage['stage'])}</b> <span class='note'>(started {created})</span>: "
                         f"<code>{html.escape(params)}</code></li>")
        parts.append(f"<details><summary>Stages and their parameters ({len(items)})</summary><ul>{''.join(items)}</ul></details>")
    return "\n".join(parts)


def write_report(run_dirs: list[Path], out: Path) -> dict[str, Path]:
    """``out`` (HTML) and ``out`` with suffix ``.md`` (the tables as Markdown)."""
    if not run_dirs:
        raise QlocError("give at least one --run-dir")
    out = Path(out)
    check_writable(out.parent, "the report")
    sections = [read_section(Path(d)) for d in run_dirs]
    anchors = [f"run-{k}" for k in range(len(sections))]
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(f'<li><a href="#{a}">{html.escape(str(s.directory))}</a>: {len(s.tables)} tables, {len(s.figures)} figures</li>'
                  for a, s in zip(anchors, sections))
    body = "\n".join(_section_html(s, a) for s, a in zip(sections, anchors))
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>qloc report</title>"
            f"<style>{_STYLE}</style><script>{_CHECK_SCRIPT}</script></head><body>"
            f"<h1>qloc report</h1><p class='note'>Made {made} from {len(sections)} director{'y' if len(sections) == 1 else 'ies'}. "
            f"Definitions: METHODS.md of qloc (Chen et al., ICLR 2025, \"Knowledge Localization: Mission Not Accomplished? "
            f"Enter Query Localization!\").</p><nav><ul>{toc}</ul></nav>{body}</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    md = out.with_suffix(".md")
    markdown = [f"# qloc report\n\nMade {made}.\n"]
    for section in sections:
        markdown.append(f"## {section.directory}\n")
        if section.units is not None and not section.units.empty:
            markdown.append("### Units done and skipped\n\n" + markdown_table(unit_counts(section.units)) + "\n")
        for csv, frame in section.tables:
            suffix = f"\n\n(first {ROWS_SHOWN} of {len(frame)} rows: {csv})" if len(frame) > ROWS_SHOWN else ""
            markdown.append(f"### {title_for(csv.stem, 'table')}\n\n{markdown_table(frame.head(ROWS_SHOWN))}{suffix}\n")
        for png in section.figures:
            markdown.append(f"![{title_for(png.stem, 'figure')}]({Path(os.path.relpath(png.resolve(), md.parent.resolve())).as_posix()})\n")
    md.write_text("\n".join(markdown), encoding="utf-8")
    return {"html": out, "markdown": md}
