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

Reading goes through the same class: :meth:`Row.decode` turns a stored record back into a row
(JSON text into lists and dicts, INTEGER into bool, NULL into NaN for a float field), and
:func:`decode_frame` does the same for a DataFrame's JSON columns. Both read a column the table
lacks (a table written before its row class gained the field) as the field's default, or None for
a field without one, so no reader needs to know which version wrote a table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import pandas as pd

_IDENTIFIER = set("abcdefghijklmnopqrstuvwxyz0123456789_")
PlainRow = Mapping[str, Any]
_R = TypeVar("_R", bound="Row")


@dataclasses.dataclass
class Row:
    """Base of the result rows; ``table`` names the table a subclass's rows go to."""

    table: ClassVar[str]
    unstored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def schema(cls) -> list[tuple[str, str]]:
        """(column, SQL type) of every column, in order."""
        return [(column_name(path[-1]), sql_type(field_type)) for path, field_type in cls._columns(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Per column, what a row stored before the column existed reads: its field's default, else None."""
        return {column_name(path[-1]): _default(cls, path) for path, _ in cls._columns(cls)}

    @classmethod
    def json_columns(cls) -> list[str]:
        """The columns stored as JSON text (list and dict fields)."""
        return [column_name(path[-1]) for path, field_type in cls._columns(cls) if _is_json(field_type)]

    @classmethod
    def decode(cls: type[_R], record: Mapping[str, Any]) -> _R:
        """The row a stored record (column -> SQL value) holds; a column it lacks reads as its default.
        A nested dataclass's unstored fields read None."""
        defaults = cls.defaults()
        fields: dict[str, Any] = {}
        for path, field_type in cls._columns(cls):
            column = column_name(path[-1])
            value = record[column] if column in record else defaults[column]
            functools.reduce(lambda d, k: d.setdefault(k, {}), path[:-1], fields)[path[-1]] = decode_value(
                field_type, value
            )
        return _build(cls, fields)

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


def _default(of: type[Any], path: tuple[str, ...]) -> Any:
    for name in path[:-1]:
        of = typing.get_type_hints(of)[name]
    field = {f.name: f for f in dataclasses.fields(of)}[path[-1]]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _build(of: type[Any], fields: dict[str, Any]) -> Any:
    """An instance of dataclass ``of`` from its fields' values (nested ones as dicts)."""
    hints = typing.get_type_hints(of)
    values = {}
    for f in dataclasses.fields(of):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], fields.get(f.name, {}))
        else:
            values[f.name] = fields.get(f.name)
    return of(**values)


def _bare(annotation: Any) -> Any:
    """X of ``X | None``, with its generic arguments dropped (``list[int]``: list)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _is_json(annotation: Any) -> bool:
    return _bare(annotation) in (list, dict, tuple)


def decode_value(annotation: Any, value: Any) -> Any:
    """A field's value from its SQL value: the inverse of :func:`sql_value` for the field's type."""
    if value is None:
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        return float("nan") if _bare(annotation) is float and not optional else None  # NaN is stored NULL
    if _is_json(annotation):
        return json.loads(value) if isinstance(value, str | bytes) else value
    if _bare(annotation) is bool:
        return bool(value)
    return value


def decode_frame(row_class: type[Row], frame: pd.DataFrame) -> pd.DataFrame:
    """A table read into a DataFrame, as ``row_class`` declares it: the columns it lacks added with
    their defaults (in the class's order), its JSON columns as lists and dicts."""
    frame = frame.copy()
    defaults = row_class.defaults()
    for column, default in defaults.items():
        if column not in frame:
            frame[column] = [default] * len(frame)
    keys = [c for c in ("stage", "unit_id") if c in frame]
    frame = frame[keys + list(defaults) + [c for c in frame if c not in defaults and c not in keys]]
    for column in row_class.json_columns():
        frame[column] = [json.loads(v) if isinstance(v, str) else v for v in frame[column]]
    return frame


def column_name(field: str) -> str:
    return field.removesuffix("_")


def sql_type(annotation: Any) -> str:
    """The SQL type of a field's annotation (``X | None``: that of X)."""
    kind = _bare(annotation)
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
