"""Writing result tables and figures the way every command does: tables as CSV and Markdown
under ``<dir>/tables``, figures as PNG and SVG under ``<dir>/figures``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table without the optional tabulate dependency."""
    def cell(value) -> str:
        if isinstance(value, float):
            if np.isnan(value):
                return "nan"
            return f"{value:.3g}" if (abs(value) < 1e-3 and value) or abs(value) >= 1e5 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_table(table: pd.DataFrame, directory: Path, name: str) -> Path:
    """``directory/name.csv`` and ``directory/name.md``; returns the CSV's path."""
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / f"{name}.csv", index=False)
    (directory / f"{name}.md").write_text(markdown_table(table) + "\n")
    return directory / f"{name}.csv"


def save_figure(fig, directory: Path, name: str) -> Path:
    """``directory/name.png`` and ``.svg``, then close the figure; returns the PNG's path."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        fig.savefig(directory / f"{name}.{suffix}", dpi=150)
    plt.close(fig)
    return directory / f"{name}.png"
