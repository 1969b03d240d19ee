"""The run store: one SQLite database per run directory, one transaction per unit of work.

A run directory holds ``qloc.sqlite`` (results, finished units, skips, parameters),
``params.json`` (the parameters of each stage run in it) and ``environment.json`` (model,
library versions, machine). A sweep commits each finished fact in its own transaction, so a
``kill -9`` loses at most the fact in flight; rerunning the same command skips finished facts.
Reopening a stage with different parameters is refused, naming the parameter that differs.

Results tables are created from the first rows written to them (column types from the Python
values; lists and dicts are stored as JSON) and load into pandas with :meth:`RunStore.frame`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import RunDirectoryError

STORE_FILE = "qloc.sqlite"
_IDENT_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY, params TEXT NOT NULL, environment TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    stage TEXT NOT NULL, unit_id TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    seconds REAL, finished REAL NOT NULL, PRIMARY KEY (stage, unit_id)
);
"""


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside every stage's parameters."""
    versions = {}
    for package in ("qloc", "torch", "transformers", "numpy", "scipy", "pandas"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _check_identifier(name: str) -> str:
    if not name or not set(name) <= _IDENT_OK or name[0].isdigit():
        raise ValueError(f"invalid table or column name {name!r}")
    return name


def _sql_type(value: Any) -> str:
    if isinstance(value, bool | int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    if isinstance(value, bytes):
        return "BLOB"
    return "TEXT"


def _sql_value(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bytes):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return value.item()
    return json.dumps(value)


class UnitWriter:
    """Collects the rows of one unit of work; they are written when the unit commits."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, table: str, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        rows = [rows] if isinstance(rows, Mapping) else rows
        self.rows.setdefault(_check_identifier(table), []).extend(dict(r) for r in rows)


class RunStore:
    """A run directory's store. Open it with :meth:`open_stage` for a sweep, or
    :meth:`open_existing` to read results."""

    def __init__(self, run_dir: Path, connection: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self._db = connection

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open_existing(cls, run_dir: str | Path) -> "RunStore":
        run_dir = Path(run_dir)
        if not (run_dir / STORE_FILE).is_file():
            raise RunDirectoryError(f"{str(run_dir)!r} is not a qloc run directory (no {STORE_FILE})")
        return cls(run_dir, cls._connect(run_dir / STORE_FILE))

    @classmethod
    def open_stage(
        cls, run_dir: str | Path, stage: str, params: Mapping[str, Any], env: Mapping[str, Any] | None = None
    ) -> "RunStore":
        """Create the run directory or resume it; refuse parameters that differ from the stored ones."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirectoryError(f"run directory {str(run_dir)!r} is a file")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / STORE_FILE).exists():
            raise RunDirectoryError(
                f"{str(run_dir)!r} is not empty and is not a qloc run directory (no {STORE_FILE}); "
                "choose a new or empty directory"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        store = cls(run_dir, cls._connect(run_dir / STORE_FILE))
        store._register_stage(stage, json.loads(json.dumps(dict(params))), dict(env or environment()))
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    @classmethod
    def check_stage(cls, run_dir: str | Path, stage: str, params: Mapping[str, Any]) -> None:
        """Refuse, before any work (such as loading a model), parameters that :meth:`open_stage`
        would refuse; a directory without a store passes."""
        if (Path(run_dir) / STORE_FILE).is_file():
            with cls.open_existing(run_dir) as store:
                store._refuse_other_params(stage, json.loads(json.dumps(dict(params))))

    def _register_stage(self, stage: str, params: dict[str, Any], env: dict[str, Any]) -> None:
        if self._db.execute("SELECT 1 FROM stages WHERE stage = ?", (stage,)).fetchone() is None:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO stages VALUES (?, ?, ?, ?)", (stage, json.dumps(params), json.dumps(env), time.time())
                )
            self._write_sidecars()
            return
        self._refuse_other_params(stage, params)

    def _refuse_other_params(self, stage: str, params: dict[str, Any]) -> None:
        row = self._db.execute("SELECT params FROM stages WHERE stage = ?", (stage,)).fetchone()
        if row is None:
            return
        stored = json.loads(row[0])
        differing = sorted(k for k in stored.keys() | params.keys() if stored.get(k) != params.get(k))
        if differing:
            details = "; ".join(f"{k}: stored {stored.get(k)!r}, given {params.get(k)!r}" for k in differing)
            raise RunDirectoryError(
                f"run directory {str(self.run_dir)!r} holds a {stage!r} run with other parameters ({details}). "
                "Use the same parameters to resume, or another --run-dir for a new run."
            )

    def _write_sidecars(self) -> None:
        stages = self._db.execute("SELECT stage, params, environment FROM stages ORDER BY created").fetchall()
        (self.run_dir / "params.json").write_text(
            json.dumps({s: json.loads(p) for s, p, _ in stages}, indent=2, sort_keys=True) + "\n"
        )
        (self.run_dir / "environment.json").write_text(
            json.dumps({s: json.loads(e) for s, _, e in stages}, indent=2, sort_keys=True) + "\n"
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------
    def params(self, stage: str) -> dict[str, Any]:
        row = self._db.execute("SELECT params FROM stages WHERE stage = ?", (stage,)).fetchone()
        if row is None:
            raise RunDirectoryError(f"run directory {str(self.run_dir)!r} has no {stage!r} stage")
        return json.loads(row[0])

    def stages(self) -> list[dict[str, Any]]:
        """Every stage run in this directory, oldest first: name, parameters, environment, start time."""
        rows = self._db.execute("SELECT stage, params, environment, created FROM stages ORDER BY created").fetchall()
        return [{"stage": s, "params": json.loads(p), "environment": json.loads(e), "created": c} for s, p, e, c in rows]

    def finished_units(self, stage: str) -> set[str]:
        """Units that are done or were skipped (both are not redone on resume)."""
        return {r[0] for r in self._db.execute("SELECT unit_id FROM units WHERE stage = ?", (stage,))}

    def units(self, stage: str | None = None) -> pd.DataFrame:
        query, args = "SELECT * FROM units", ()
        if stage is not None:
            query, args = query + " WHERE stage = ?", (stage,)
        return pd.read_sql_query(query + " ORDER BY finished", self._db, params=args)

    def tables(self) -> list[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [r[0] for r in rows if r[0] not in ("stages", "units")]

    def frame(self, table: str) -> pd.DataFrame:
        """A results table as a DataFrame (one call: ``RunStore.open_existing(d).frame("cloze")``)."""
        if table not in self.tables():
            raise RunDirectoryError(f"run directory {str(self.run_dir)!r} has no table {table!r}; it has {self.tables()}")
        return pd.read_sql_query(f"SELECT * FROM {_check_identifier(table)} ORDER BY rowid", self._db)

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def unit(self, stage: str, unit_id: str) -> Iterator[UnitWriter]:
        """Collect a unit's rows; on a clean exit write them and mark the unit done in one
        transaction. An exception writes nothing."""
        writer = UnitWriter()
        started = time.perf_counter()
        yield writer
        self.commit_unit(stage, unit_id, writer.rows, time.perf_counter() - started)

    def commit_unit(self, stage: str, unit_id: str, rows: Mapping[str, Sequence[Mapping[str, Any]]], seconds: float | None) -> None:
        """Write a finished unit's rows (table -> rows) and mark it done, in one transaction.
        A unit already marked is refused by the units table's key, so it is never written twice."""
        with self._transaction():
            for table, table_rows in rows.items():
                self._insert(_check_identifier(table), stage, unit_id, [dict(r) for r in table_rows])
            self._mark(stage, unit_id, "done", None, seconds)

    def skip(self, stage: str, unit_id: str, reason: str) -> None:
        with self._transaction():
            self._mark(stage, unit_id, "skipped", reason, None)

    def _mark(self, stage: str, unit_id: str, status: str, reason: str | None, seconds: float | None) -> None:
        self._db.execute(
            "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)", (stage, unit_id, status, reason, seconds, time.time())
        )

    def _insert(self, table: str, stage: str, unit_id: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = ["stage", "unit_id"] + [_check_identifier(c) for c in rows[0]]
        if any(row.keys() != rows[0].keys() for row in rows):
            raise ValueError(f"rows for table {table!r} do not all have the columns {list(rows[0])}")
        existing = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
        if not existing:
            types = ["TEXT", "TEXT"] + [_sql_type(v) for v in rows[0].values()]
            spec = ", ".join(f"{c} {t}" for c, t in zip(columns, types))
            self._db.execute(f"CREATE TABLE {table} ({spec})")
            self._db.execute(f"CREATE INDEX {table}_unit ON {table} (stage, unit_id)")
        elif missing := [c for c in columns if c not in existing]:
            raise RunDirectoryError(f"table {table!r} in {str(self.run_dir)!r} has no column(s) {missing}")
        placeholders = ", ".join("?" for _ in columns)
        self._db.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
            [[stage, unit_id] + [_sql_value(r.get(c)) for c in columns[2:]] for r in rows],
        )
