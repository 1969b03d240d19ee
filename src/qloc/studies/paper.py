"""The paper's numbers (``data/paper_reference.json``): every cell of its Tables 1-4, 6 and 7 as
records, and the quotes the report sets beside qloc's measurements.

A quote is the cell of the paper's model closest in size to the measured model, with the range of
the same cell over the paper's three models beside it. Where the paper has no cell (a figure with no
numbers, a p-value it never printed) the quote says why, and carries no number: the report then
makes no call (:meth:`qloc.studies.claims.ClaimRules.add`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.paper_reference import paper_reference_data
from ..numbers import format_number, format_share


@dataclass(frozen=True)
class PaperQuote:
    """What the report shows in its "paper" column, and whether it holds the paper's numbers."""

    text: str
    values: tuple[float, ...] = ()
    """The reference model's cells; empty where the paper has none."""
    low: float | None = None
    high: float | None = None
    """The same cell's range over the paper's models (one cell quoted alone)."""

    @property
    def has_number(self) -> bool:
        return bool(self.values)

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies within the range over the paper's models (rounded as printed)."""
        if self.low is None or self.high is None:
            return False
        return self.low - 0.005 <= value <= self.high + 0.005

    def __str__(self) -> str:
        return self.text


def no_paper_number(reason: str) -> PaperQuote:
    """A quote for a measurement the paper gives no number for, saying why."""
    return PaperQuote(reason)


@dataclass
class PaperReference:
    """The paper's tables and claims (``data/paper_reference.json``)."""

    paper: str
    models: dict[str, str]
    """Which of the paper's models a small and a large model are compared with."""
    tables: dict[str, dict[str, Any]]
    claims: dict[str, dict[str, Any]]

    def rows(self, table: str) -> pd.DataFrame:
        """One of the paper's tables as a DataFrame (one row per record of the reference file)."""
        return pd.DataFrame(self.tables[table]["rows"])

    def _matching(self, table: str, keys: Mapping[str, str]) -> pd.DataFrame:
        frame = self.rows(table)
        for column, value in keys.items():
            frame = frame[frame[column] == value] if column in frame else frame.iloc[0:0]
        return frame

    def cell(self, table: str, column: str, model: str, **keys: str) -> float | None:
        """The paper's number in ``column`` of ``table`` for ``model`` and ``keys``, or None."""
        found = self._matching(table, {"model": model, **keys})
        if found.empty or column not in found or pd.isna(found[column].iloc[0]):
            return None
        return float(found[column].iloc[0])

    def quote(self, table: str, column: str, model: str, share: bool = False, **keys: str) -> PaperQuote:
        """``model``'s cell and the range of the same cell over the paper's models, as
        "0.44 (paper's models 0.44-0.85)"; a quote without number where the table has no such cell."""
        value = self.cell(table, column, model, **keys)
        if value is None:
            return no_paper_number(f"no cell in the paper's {self.title(table)} for {model}")
        shown = format_share if share else format_number
        span = self._matching(table, keys)[column].dropna()
        low, high = float(span.min()), float(span.max())
        spread = f"{shown(low)}-{shown(high)}" if low != high else shown(low)
        return PaperQuote(
            f"{shown(value)} (paper's {span.size} cells over its models: {spread})", (value,), low, high
        )

    def quote_each(
        self, table: str, column: str, model: str, labelled: Mapping[str, Mapping[str, str]]
    ) -> PaperQuote:
        """Several cells side by side ("Self 0.09 / Union 0.60"); without number unless all exist."""
        values = {label: self.cell(table, column, model, **keys) for label, keys in labelled.items()}
        missing = [label for label, value in values.items() if value is None]
        if missing:
            return no_paper_number(
                f"no cell in the paper's {self.title(table)} for {model}, {', '.join(missing)}"
            )
        numbers = tuple(v for v in values.values() if v is not None)
        return PaperQuote(" / ".join(f"{label} {format_number(v)}" for label, v in values.items()), numbers)

    def title(self, table: str) -> str:
        """How the report names a table of the paper ("Table 2")."""
        return "Table " + table.removeprefix("table").split("_")[0]

    def where(self, claim: str) -> str:
        return self.claims[claim]["where"]

    def text(self, claim: str) -> str:
        return self.claims[claim]["claim"]

    def unquoted(self, claim: str) -> str:
        """Why the paper has no number for a claim shown only in a figure."""
        return self.claims[claim].get("no_numbers", f"the paper gives no number for {self.where(claim)}")


def load_paper_reference(path: Path | None = None) -> PaperReference:
    """The reference shipped with qloc, or another file of the same form."""
    data = paper_reference_data(path)
    return PaperReference(data["paper"], data["reference_models"], data["tables"], data["claims"])
