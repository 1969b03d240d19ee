"""Result rows and their tables' schemas.

A study's results are rows of dataclasses derived from :class:`Row`: the class names its table
(``table``), its fields are the table's columns in order, and their types are the columns' SQL
types (int and bool: INTEGER, float: REAL, bytes: BLOB, str: TEXT; lists and dicts are stored as
JSON text). A field that holds a dataclass (an engine result) stores that dataclass's fields as
columns, but for those the row class leaves out (``unstored``). A field named after a Python
keyword ends in ``_`` (``class_``), which the column name drops. The run store creates each table
from its row class, so the schema is the class, not whatever the first row held. (A table no study
declares may still be written as plain dicts: its column types are then those of the first row's
values.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

_IDENTIFIER = set("abcdefghijklmnopqrstuvwxyz0123456789_")
PlainRow = Mapping[str, Any]


@dataclasses.dataclass
class Row:
    """Base of the result rows; ``table`` names the table a subclass's rows go to."""

    table: ClassVar[str]
    unstored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def schema(cls) -> list[tuple[str, str]]:
        """(column, SQL type) of every column, in order."""
        return [(column_name(path[-1]), sql_type(kind)) for path, kind in cls._columns(cls)]

    def values(self) -> list[Any]:
        return [functools.reduce(getattr, path, self) for path, _ in self._columns(type(self))]

    @classmethod
    def _columns(cls, of: type[Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
        """(field path from a row, type) of every column of ``of``, nested dataclasses flattened."""
        hints = typing.get_type_hints(of)
        columns: list[tuple[tuple[str, ...], Any]] = []
        for f in dataclasses.fields(of):
            here = (*path, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                columns += [c for c in cls._columns(hints[f.name], here) if c[0][-1] not in cls.unstored]
            else:
                columns.append((here, hints[f.name]))
        return columns


def column_name(field: str) -> str:
    return field.removesuffix("_")


def sql_type(annotation: Any) -> str:
    """The SQL type of a field's annotation (``X | None``: that of X)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    kind = typing.get_origin(annotation) or annotation
    if kind in (bool, int):
        return "INTEGER"
    return {float: "REAL", bytes: "BLOB"}.get(kind, "TEXT")


def value_type(value: Any) -> str:
    """The SQL type of a plain row's value."""
    return sql_type(type(value)) if isinstance(value, bool | int | float | bytes) else "TEXT"


def sql_value(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bytes):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return value.item()
    return json.dumps(value)


def check_identifier(name: str) -> str:
    if not name or not set(name) <= _IDENTIFIER or name[0].isdigit():
        raise ValueError(f"invalid table or column name {name!r}")
    return name


class UnitWriter:
    """Collects the rows of one unit of work, by table; they are written when the unit commits."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Row | PlainRow]] = {}

    def add(self, rows: Row | Sequence[Row] | str, plain: PlainRow | Sequence[PlainRow] = ()) -> None:
        """Add typed rows (their class names the table), or, for a table no study declares, its
        name and its rows as dicts."""
        if isinstance(rows, str):
            chosen: list[Row | PlainRow] = [plain] if isinstance(plain, Mapping) else [dict(r) for r in plain]
            self.rows.setdefault(check_identifier(rows), []).extend(chosen)
            return
        for row in [rows] if isinstance(rows, Row) else rows:
            self.rows.setdefault(check_identifier(row.table), []).append(row)


def table_layout(table: str, rows: Sequence[Row | PlainRow]) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    """(column, SQL type) of a table and the SQL values of its rows, column by column."""
    first = rows[0]
    if isinstance(first, Row):
        if any(type(row) is not type(first) for row in rows):
            raise ValueError(f"rows for table {table!r} are not all {type(first).__name__}")
        typed = [row for row in rows if isinstance(row, Row)]
        return first.schema(), [[sql_value(v) for v in row.values()] for row in typed]
    if any(not isinstance(row, Mapping) or row.keys() != first.keys() for row in rows):
        raise ValueError(f"rows for table {table!r} do not all have the columns {list(first)}")
    schema = [(check_identifier(c), value_type(v)) for c, v in first.items()]
    return schema, [[sql_value(row[c]) for c, _ in schema] for row in rows]  # type: ignore[index]
