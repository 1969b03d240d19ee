"""Writing outputs the way every command does: tables as CSV and Markdown under ``<dir>/tables``,
figures as PNG and SVG under ``<dir>/figures``, each file written whole or not at all (a temporary
file beside it, renamed over it), and never over a run directory's own files."""

from __future__ import annotations

import errno
import html
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import QlocError
from .lock import LOCK_FILE, STORE_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def markdown_table(frame: pd.DataFrame, escaped: bool = True) -> str:
    """A Markdown table without the optional tabulate dependency; ``escaped``: every header and cell
    as :func:`markdown_text` (for a file; the terminal shows text as it is)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if np.isnan(value):
                return "nan"
            return f"{value:.3g}" if (abs(value) < 1e-3 and value) or abs(value) >= 1e5 else f"{value:.3f}"
        return str(value)

    text = markdown_text if escaped else cell
    lines = ["| " + " | ".join(text(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(text(cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


MARKDOWN_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*[]|"})


def markdown_text(value: object) -> str:
    """Text from data as Markdown that shows it as it is: HTML escaped (Markdown renderers pass raw
    HTML through, an ``<img onerror=...>`` included), the characters of tables, code, links and
    emphasis backslash-escaped, line breaks as ``<br>`` (a table row is one line)."""
    text = html.escape(str(value), quote=False).translate(MARKDOWN_SPECIALS)
    return "<br>".join(text.splitlines())


RUN_FILES = frozenset(
    {STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", f"{STORE_FILE}-journal", LOCK_FILE}
    | {"params.json", "environment.json"}
)
"""A run directory's own files (:mod:`qloc.runs.store`), which no output may replace."""


def check_writable(directory: Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: the nearest part of it
    that exists must be a folder where a file can be created (the missing rest is created when the
    output is written). A file is tried: permission bits do not tell (root, read-only mounts)."""
    directory = Path(directory)
    nearest = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise QlocError(f"cannot write {what} to {str(directory)!r}: {str(nearest)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise QlocError(
            f"cannot write {what} to {str(directory)!r}: folder {str(nearest)!r} is not writable ({reason})"
        ) from None


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file that is a folder or one of a run directory's own
    files (following links), or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise QlocError(f"cannot write {what} to {str(path)!r}: it is a folder; name a file")
    target = Path(os.path.realpath(path))
    if target.name in RUN_FILES and (target.parent / STORE_FILE).exists():
        raise QlocError(
            f"cannot write {what} to {str(path)!r}: it is one of the files of run directory "
            f"{str(target.parent)!r}; name another file"
        )
    check_writable(path.parent, what)


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file beside it, which then
    replaces it, so a failure (a full disk) leaves the previous file as it was. A write that fails
    is one error naming the path."""
    path = Path(path)
    # Named by the process, opened as an ordinary file: it gets the permissions the umask gives.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "wb") as out:
                write(out)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise output_error(path, exc) from None
    return path


def write_text(path: Path, text: str) -> Path:
    """``path`` holding ``text`` (UTF-8), written atomically."""
    return write_atomically(path, lambda out: out.write(text.encode("utf-8")))


def output_error(path: Path, exc: OSError) -> QlocError:
    """The one-line error of an output that could not be written."""
    if exc.errno == errno.ENOSPC:
        return QlocError(f"disk full at {str(path)!r}: free some space and rerun the command")
    return QlocError(f"cannot write {str(path)!r}: {exc.strerror or exc}")


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    """``table`` as CSV at ``path``, written atomically."""
    return write_atomically(path, lambda out: table.to_csv(out, index=False))


def write_table(table: pd.DataFrame, directory: Path, name: str) -> Path:
    """``directory/name.csv`` and ``directory/name.md``; returns the CSV's path."""
    csv = write_csv(table, directory / f"{name}.csv")
    write_text(directory / f"{name}.md", markdown_table(table) + "\n")
    return csv


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
    try:
        for suffix in ("png", "svg"):
            write_atomically(directory / f"{name}.{suffix}", partial(fig.savefig, format=suffix, dpi=150))
    finally:
        plt.close(fig)
    return directory / f"{name}.png"
