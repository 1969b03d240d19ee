"""Writing result tables and figures the way every command does: tables as CSV and Markdown
under ``<dir>/tables``, figures as PNG and SVG under ``<dir>/figures``."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import QlocError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table without the optional tabulate dependency."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if np.isnan(value):
                return "nan"
            return f"{value:.3g}" if (abs(value) < 1e-3 and value) or abs(value) >= 1e5 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def check_writable(directory: Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: the nearest part of it
    that exists must be a writable folder (the missing rest is created when the output is written)."""
    directory = Path(directory)
    nearest = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise QlocError(f"cannot write {what} to {str(directory)!r}: {str(nearest)!r} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise QlocError(f"cannot write {what} to {str(directory)!r}: folder {str(nearest)!r} is not writable")


def write_table(table: pd.DataFrame, directory: Path, name: str) -> Path:
    """``directory/name.csv`` and ``directory/name.md``; returns the CSV's path."""
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / f"{name}.csv", index=False)
    (directory / f"{name}.md").write_text(markdown_table(table) + "\n")
    return directory / f"{name}.csv"


def pyplot() -> ModuleType:
    """matplotlib's pyplot, imported when a figure is drawn, on the Agg backend: qloc draws
    figures into files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, directory: Path, name: str) -> Path:
    """``directory/name.png`` and ``.svg``, then close the figure; returns the PNG's path."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        fig.savefig(directory / f"{name}.{suffix}", dpi=150)
    plt.close(fig)
    return directory / f"{name}.png"
