"""What the report reads from each directory it is given: ``tables/*.csv`` and ``figures/*.png``
as the commands left them (:mod:`qloc.runs.outputs`) and, where it is a run directory, its store;
and the panels (tables beside figures, titled) that the studies declare (``STUDIES``), in the
paper's order. A run directory whose KN consistency was not computed into it gets Table 1 and
Figures 3/7/8/9 computed from its store's KN sets, in memory (nothing is written into the run)."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..engine.models import model_label
from ..errors import ConfigError, QlocError
from ..runs.outputs import pyplot
from ..runs.store import STORE_FILE, RunStore
from ..studies import STUDIES
from ..studies.consistency import consistency_study, written_by_consistency
from ..studies.knrows import CasSetRow, KnSetRow
from ..studies.registry import Panel
from ..studies.stored_knsets import LOCALIZE_STAGE, load_kn_sets

if TYPE_CHECKING:
    from matplotlib.figure import Figure as PlotFigure


log = logging.getLogger("qloc")
ROWS_SHOWN = 40
"""Longer tables show their first rows; the whole CSV is embedded as a download link."""


STORE_TABLES = ("kn_sets", "cas_sets", "edits", "mapping", "synapses", "synapse_effects")
"""Store tables the findings and the explorer read."""
DECODED_TABLES = {"kn_sets": KnSetRow, "cas_sets": CasSetRow}
"""Those read through their row classes (KN sets as lists)."""


FIGURE_DPI = 110


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


def _from_result_files(section: RunSection) -> None:
    """A results folder without its store (as committed under docs/results): the model and its
    environment from the ``params.json`` and ``environment.json`` the run wrote beside its tables."""
    try:
        params = json.loads((section.directory / "params.json").read_text(encoding="utf-8"))
        environments = json.loads((section.directory / "environment.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if (
        isinstance(params, dict)
        and isinstance(params.get(LOCALIZE_STAGE), dict)
        and "model" in params[LOCALIZE_STAGE]
    ):
        section.model = model_label(params[LOCALIZE_STAGE]["model"])
    if isinstance(environments, dict) and environments:
        section.environment = environments.get(LOCALIZE_STAGE) or next(iter(environments.values()))


def read_section(directory: Path) -> RunSection:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError.invalid("run_dirs", str(directory), "not a directory")
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
            section.store = {
                name: store.frame(DECODED_TABLES.get(name, name)) for name in STORE_TABLES if name in present
            }
            stages = {s["stage"]: s["params"] for s in section.stages}
            if LOCALIZE_STAGE in stages:
                section.model = model_label(stages[LOCALIZE_STAGE]["model"])
        section.environment = section.stages[-1]["environment"] if section.stages else {}
    else:
        _from_result_files(section)
    if not (section.tables or section.figures or section.stages):
        raise QlocError(f"{str(directory)!r} has no qloc tables, figures or run store")
    if (moved_on := _store_moved_on(section)) is not None:
        log.warning(
            "the KN consistency tables in %r predate its store (%s): the report computes them from the "
            "store instead; `qloc consistency --run-dir %s` rewrites the files",
            str(directory / "tables"),
            moved_on,
            directory,
        )
        for outputs in (section.tables, section.figures):
            for name in [n for n in outputs if written_by_consistency(n)]:
                del outputs[name]
    if "table1" not in section.tables and "kn_sets" in section.store and section.model:
        _add_consistency(section)
    return section


def _store_moved_on(section: RunSection) -> str | None:
    """How the run's KN sets differ from the facts its ``tables/consistency.csv`` was computed from
    (a localize run resumed after ``qloc consistency``), or None where they agree or cannot be
    compared."""
    if "consistency" not in section.tables or "kn_sets" not in section.store or not section.model:
        return None
    written = section.tables["consistency"].frame
    if not {"model", "fact_id", "method"} <= set(written.columns):
        return None
    written = written[written["model"] == section.model]
    stored = section.store["kn_sets"]
    written_pairs = set(zip(written["fact_id"], written["method"]))
    stored_pairs = set(zip(stored["fact_id"], stored["method"]))
    if written_pairs == stored_pairs:
        return None
    return (
        f"they cover {len(written_pairs)} (fact, method) pairs, its KN sets {len(stored_pairs)}, "
        f"{len(stored_pairs - written_pairs)} of them new"
    )


def _png(fig: PlotFigure) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return buffer.getvalue()


def _add_consistency(section: RunSection) -> None:
    """Table 1 (with its chance baseline), the per-fact scores and Figures 3/7/8/9 from the store's
    KN sets, as ``qloc consistency`` would write them for this one run."""
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


def method_order(name: str) -> tuple:
    """IG, AMIG, SIG first in that order (the paper's), their first-order tier next, then by name."""
    order = {"ig": 0, "amig": 1, "sig": 2, "gxa": 3, "gxa-amig": 4}
    return (order.get(name.rsplit("_", 1)[-1], 9), name)


def figures_of(section: RunSection, panel: Panel) -> list[Figure]:
    """The section's figures of ``panel``; a name ending in ``*`` takes every figure it starts."""
    found = []
    for pattern in panel.figures:
        if pattern.endswith("*"):
            found += [f for n, f in sorted(section.figures.items()) if n.startswith(pattern[:-1])]
        elif pattern in section.figures:
            found.append(section.figures[pattern])
    return found


def panels_for(section: RunSection) -> list[tuple[Panel, str]]:
    """The section's panels in the paper's order (every study's, one per method where a panel is
    per method), then one for each table or figure no study declares; each with the key of its
    caption (the name it was declared under)."""
    names = set(section.tables) | set(section.figures)
    chosen: list[tuple[Panel, str]] = []
    for template in sorted((p for study in STUDIES for p in study.panels), key=lambda p: p.order):
        concrete = (
            [template.for_method(m) for m in _methods(template, names)] if template.per_method else [template]
        )
        chosen += [
            (p, template.key)
            for p in concrete
            if set(p.tables) & set(section.tables) or figures_of(section, p)
        ]
    used = {t for p, _ in chosen for t in p.tables} | {
        f.name for p, _ in chosen for f in figures_of(section, p)
    }
    for name in sorted(names - used, key=method_order):
        tables = (name,) if name in section.tables else ()
        figures = (name,) if name in section.figures else ()
        chosen.append((Panel(0, name.replace("_", " "), tables, figures), ""))
    return chosen


def _methods(template: Panel, names: set[str]) -> list[str]:
    """The methods a per-method panel has names for, IG, AMIG, SIG first."""
    prefixes = [name.split("{method}")[0] for name in template.tables + template.figures]
    found = {name[len(prefix) :] for name in names for prefix in prefixes if name.startswith(prefix)}
    return sorted(found, key=lambda method: method_order(f"_{method}"))
