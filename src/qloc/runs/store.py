"""The run store: one SQLite database per run directory, one transaction per unit of work.

A run directory holds ``qloc.sqlite`` (results, finished units, skips, parameters, and a digest
of every fact a stage works on, with the data file it came from),
``params.json`` (the parameters of each stage run in it) and ``environment.json`` (model,
library versions, machine). A sweep commits each finished fact in its own transaction, so a
``kill -9`` loses at most the fact in flight; rerunning the same command skips finished facts.
Reopening a stage with different parameters is refused, naming the parameter that differs, and so
is a fact that its data file now states otherwise than when the stage recorded it.

One process writes a run directory at a time: a writer holds :class:`RunLock` (``qloc.lock``)
for its whole sweep, and a second writer is refused at once. Readers take no lock and open the
database read-only, so that analysing a run never changes its directory.

Results tables are created from their row classes (:mod:`qloc.runs.rows`: the explicit schema
of each table), and read back through them: typed rows with :meth:`RunStore.rows`, or a DataFrame
with :meth:`RunStore.frame`. A table written by an older qloc, before its class gained a field,
reads that column as the field's default.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from ..data.pararel import Fact
from ..errors import QlocError, RunDirectoryError
from .lock import LOCK_FILE, STORE_FILE, RunLock
from .outputs import write_text
from .rows import PlainRow, Row, check_identifier, decode_frame, table_layout

__all__ = ["LOCK_FILE", "STORE_FILE", "RunLock", "RunStore", "environment"]

_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY, params TEXT NOT NULL, environment TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    stage TEXT NOT NULL, unit_id TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    seconds REAL, finished REAL NOT NULL, PRIMARY KEY (stage, unit_id)
);
CREATE TABLE IF NOT EXISTS fact_digests (
    stage TEXT NOT NULL, fact_id TEXT NOT NULL, digest TEXT NOT NULL, fact TEXT NOT NULL,
    source TEXT NOT NULL, PRIMARY KEY (stage, fact_id)
);
"""
BOOKKEEPING_TABLES = ("stages", "units", "fact_digests")
"""The store's own tables; the others hold results."""


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside every stage's parameters."""
    versions: dict[str, str | None] = {}
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


def _in_wal_mode(path: Path) -> bool:
    """Whether the SQLite header says WAL (its read and write format versions are 2)."""
    with open(path, "rb") as f:
        header = f.read(20)
    return header.startswith(_SQLITE_MAGIC) and header[18:20] == b"\x02\x02"


def _check_store_file(path: Path) -> None:
    """Refuse a store file that is not a whole SQLite database before anything reads or writes it.
    SQLite itself notices a truncated file only when a query reaches a missing page, which for a
    sweep may be after its model has loaded and the store has been written to."""
    size = path.stat().st_size
    if size == 0:  # SQLite's empty database; a store killed while being created
        return
    with open(path, "rb") as f:
        header = f.read(100)
    if not header.startswith(_SQLITE_MAGIC):
        raise RunDirectoryError(
            f"run store {str(path)!r} is not a SQLite database: it does not begin with SQLite's header"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid where the change counter equals "version valid for" (file format docs).
    # With a -wal file beside it the main file may lag behind its WAL, so it is checked only at rest.
    counted = len(header) == 100 and header[24:28] == header[92:96] and pages > 0
    if counted and not Path(f"{path}-wal").exists() and size < pages * page_size:
        raise RunDirectoryError(
            f"run store {str(path)!r} is not a SQLite database: it is truncated "
            f"({size:,} of {pages * page_size:,} bytes)"
        )


def _damaged_store(path: Path, exc: BaseException) -> RunDirectoryError | None:
    """The user-facing error for a store file SQLite cannot read as a database (junk, truncated),
    or None for any other error. ``exc`` may be pandas' wrapper of SQLite's error."""
    cause = exc if isinstance(exc, sqlite3.DatabaseError) else exc.__cause__
    # SQLITE_NOTADB and SQLITE_CORRUPT raise the base class itself; its subclasses
    # (OperationalError, IntegrityError, ...) are about queries, locks and permissions.
    if type(cause) is not sqlite3.DatabaseError:
        return None
    return RunDirectoryError(f"run store {str(path)!r} is not a SQLite database: {cause}")


_Method = TypeVar("_Method", bound=Callable[..., Any])
_R = TypeVar("_R", bound=Row)


def _reads_store(method: _Method) -> _Method:
    """Report a damaged store file as the user's input problem, naming the file."""

    @functools.wraps(method)
    def reading(self: RunStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
            damaged = _damaged_store(self.run_dir / STORE_FILE, exc)
            if damaged is None:
                raise
            raise damaged from None

    return reading  # type: ignore[return-value]


class RunStore:
    """A run directory's store. Open it with :meth:`open_stage` for a sweep, or
    :meth:`open_existing` to read results."""

    def __init__(self, run_dir: Path, connection: sqlite3.Connection, lock: RunLock | None = None) -> None:
        self.run_dir = run_dir
        self._db = connection
        self._lock = lock
        """Held by a store opened for writing, until :meth:`close`."""

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open_existing(cls, run_dir: str | Path, readonly: bool = True) -> RunStore:
        """Open a run to read its results. Read-only (the default), the database is opened with
        SQLite's ``mode=ro`` and nothing in the directory is created or changed, so it works on
        read-only copies; ``readonly=False`` opens it for writing, under the run's :class:`RunLock`."""
        run_dir = Path(run_dir)
        if not (run_dir / STORE_FILE).is_file():
            raise RunDirectoryError(f"{str(run_dir)!r} is not a qloc run directory (no {STORE_FILE})")
        if readonly:
            return cls(run_dir, cls._connect_readonly(run_dir / STORE_FILE))
        lock = RunLock.acquire(run_dir)
        try:
            return cls(run_dir, cls._connect(run_dir / STORE_FILE), lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open_stage(
        cls, run_dir: str | Path, stage: str, params: Mapping[str, Any], env: Mapping[str, Any] | None = None
    ) -> RunStore:
        """Create the run directory or resume it; refuse parameters that differ from the stored ones.
        The store holds the run's :class:`RunLock` until it is closed."""
        run_dir = Path(run_dir)
        lock = RunLock.acquire(run_dir)
        try:
            store = cls(run_dir, cls._connect(run_dir / STORE_FILE), lock)
        except BaseException:
            lock.release()
            raise
        try:
            store._register_stage(stage, json.loads(json.dumps(dict(params))), dict(env or environment()))
        except BaseException:
            store.close()
            raise
        return store

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        if path.is_file():
            _check_store_file(path)
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            db.close()
            damaged = _damaged_store(path, exc)
            if damaged is None:
                raise
            raise damaged from None
        return db

    @staticmethod
    def _connect_readonly(path: Path) -> sqlite3.Connection:
        _check_store_file(path)
        uri = path.absolute().as_uri() + "?mode=ro"
        # A WAL-mode store with no -wal file beside it (at rest, written by an older qloc) holds
        # everything in its main file; mode=ro alone would create -wal and -shm files there, which
        # a read-only connection can never remove, and fails where the directory is read-only.
        # immutable=1 reads the main file without them. (Stores written now are left in
        # rollback-journal mode, which mode=ro reads without any extra file.)
        if not Path(f"{path}-wal").exists() and _in_wal_mode(path):
            uri += "&immutable=1"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        except sqlite3.OperationalError as exc:
            raise RunDirectoryError(f"run store {str(path)!r} cannot be opened: {exc}") from None
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            db.close()
            damaged = _damaged_store(path, exc)
            if damaged is None:
                raise RunDirectoryError(f"run store {str(path)!r} cannot be read: {exc}") from None
            raise damaged from None
        return db

    @classmethod
    def check_stage(cls, run_dir: str | Path, stage: str, params: Mapping[str, Any]) -> None:
        """Refuse, before any work (such as loading a model), parameters that :meth:`open_stage`
        would refuse; a directory without a store passes."""
        if (Path(run_dir) / STORE_FILE).is_file():
            with cls.open_existing(run_dir) as store:
                store._refuse_other_params(stage, json.loads(json.dumps(dict(params))))

    @classmethod
    def check_facts(cls, run_dir: str | Path, stage: str, facts: Sequence[Fact], source: str) -> None:
        """Refuse, before any work, facts that :meth:`refuse_other_facts` would refuse; a directory
        without a store passes."""
        if (Path(run_dir) / STORE_FILE).is_file():
            with cls.open_existing(run_dir) as store:
                store.refuse_other_facts(stage, facts, source)

    @_reads_store
    def refuse_other_facts(self, stage: str, facts: Sequence[Fact], source: str) -> None:
        """Refuse a fact that ``stage`` recorded (:meth:`record_facts`) with other content under the
        same id: its data file was edited since, or a path now names another file. Runs made before
        facts were recorded have nothing to compare, and pass."""
        present = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fact_digests'").fetchone()
        if present is None:
            return
        recorded = {
            fact_id: (digest, label, recorded_source)
            for fact_id, digest, label, recorded_source in self._db.execute(
                "SELECT fact_id, digest, fact, source FROM fact_digests WHERE stage = ?", (stage,)
            )
        }
        for fact in facts:
            if fact.id in recorded and recorded[fact.id][0] != fact.digest:
                _, label, recorded_source = recorded[fact.id]
                raise RunDirectoryError(
                    f"run directory {str(self.run_dir)!r}: its {stage!r} stage used {label} from "
                    f"{recorded_source!r}, but {source!r} now has {fact.label} (other content under the "
                    "same id); give the data the run was made with, or use another run directory"
                )

    def record_facts(self, stage: str, facts: Sequence[Fact], source: str) -> None:
        """Remember what each fact of ``stage`` says (its digest) and where it came from; facts
        recorded before keep their record, so a run keeps the data it started with."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO fact_digests VALUES (?, ?, ?, ?, ?)",
                [(stage, fact.id, fact.digest, fact.label, source) for fact in facts],
            )

    def _register_stage(self, stage: str, params: dict[str, Any], env: dict[str, Any]) -> None:
        if self._db.execute("SELECT 1 FROM stages WHERE stage = ?", (stage,)).fetchone() is None:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO stages VALUES (?, ?, ?, ?)",
                    (stage, json.dumps(params), json.dumps(env), time.time()),
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
                f"run directory {str(self.run_dir)!r} holds a {stage!r} run with other parameters "
                f"({details}). Use the same parameters to resume, or another run directory for a new run."
            )

    def _write_sidecars(self) -> None:
        stages = self._db.execute("SELECT stage, params, environment FROM stages ORDER BY created").fetchall()
        write_text(
            self.run_dir / "params.json",
            json.dumps({s: json.loads(p) for s, p, _ in stages}, indent=2, sort_keys=True) + "\n",
        )
        write_text(
            self.run_dir / "environment.json",
            json.dumps({s: json.loads(e) for s, _, e in stages}, indent=2, sort_keys=True) + "\n",
        )

    def close(self) -> None:
        if self._lock is not None:
            # Leave the store in rollback-journal mode, which read-only readers open without -wal and
            # -shm files. The switch needs the only connection; with a reader open it is skipped at
            # once (busy_timeout 0) and SQLite keeps both modes readable.
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA busy_timeout = 0")
                self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------
    @_reads_store
    def params(self, stage: str) -> dict[str, Any]:
        row = self._db.execute("SELECT params FROM stages WHERE stage = ?", (stage,)).fetchone()
        if row is None:
            raise RunDirectoryError(f"run directory {str(self.run_dir)!r} has no {stage!r} stage")
        return json.loads(row[0])

    @_reads_store
    def stages(self) -> list[dict[str, Any]]:
        """Every stage run in this directory, oldest first: name, parameters, environment, start time."""
        rows = self._db.execute(
            "SELECT stage, params, environment, created FROM stages ORDER BY created"
        ).fetchall()
        return [
            {"stage": s, "params": json.loads(p), "environment": json.loads(e), "created": c}
            for s, p, e, c in rows
        ]

    @_reads_store
    def finished_units(self, stage: str) -> set[str]:
        """Units that are done or were skipped (both are not redone on resume)."""
        return {r[0] for r in self._db.execute("SELECT unit_id FROM units WHERE stage = ?", (stage,))}

    @_reads_store
    def units(self, stage: str | None = None) -> pd.DataFrame:
        args: tuple[str, ...]
        query, args = "SELECT * FROM units", ()
        if stage is not None:
            query, args = query + " WHERE stage = ?", (stage,)
        return pd.read_sql_query(query + " ORDER BY finished", self._db, params=args)

    @_reads_store
    def tables(self) -> list[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [r[0] for r in rows if r[0] not in BOOKKEEPING_TABLES]

    @_reads_store
    def frame(self, table: str | type[Row]) -> pd.DataFrame:
        """A results table as a DataFrame (one call: ``RunStore.open_existing(d).frame("cloze")``);
        given its row class, as the class declares it (:func:`~qloc.runs.rows.decode_frame`)."""
        name = table if isinstance(table, str) else table.table
        self._refuse_missing(name)
        frame = pd.read_sql_query(f"SELECT * FROM {check_identifier(name)} ORDER BY rowid", self._db)
        return frame if isinstance(table, str) else decode_frame(table, frame)

    @_reads_store
    def rows(self, row_class: type[_R], **where: Any) -> list[_R]:
        """The rows of ``row_class``'s table whose columns equal ``where`` (``method="ig"``), in the
        order they were written, decoded by the class (:meth:`~qloc.runs.rows.Row.decode`)."""
        self._refuse_missing(row_class.table)
        table = check_identifier(row_class.table)
        present = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
        defaults, conditions, args = row_class.defaults(), [], []
        for column, value in where.items():
            if column not in defaults:
                raise ValueError(f"{row_class.__name__} has no column {column!r}")
            if column in present:
                conditions.append(f"{column} = ?")
                args.append(value)
            elif defaults[column] != value:  # a table older than the column: every row has the default
                return []
        query = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        cursor = self._db.execute(query + " ORDER BY rowid", args)
        names = [d[0] for d in cursor.description]
        return [row_class.decode(dict(zip(names, values))) for values in cursor]

    def _refuse_missing(self, table: str) -> None:
        if table not in self.tables():
            raise RunDirectoryError(
                f"run directory {str(self.run_dir)!r} has no table {table!r}; it has {self.tables()}"
            )

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction; a full disk is one error naming the store (what was committed before stays)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            raise QlocError(
                f"disk full at {str(self.run_dir / STORE_FILE)!r}: the units finished before are stored; "
                "free some space and rerun the same command to resume"
            ) from None

    def commit_unit(
        self, stage: str, unit_id: str, rows: Mapping[str, Sequence[Row | PlainRow]], seconds: float | None
    ) -> None:
        """Write a finished unit's rows (table -> rows) and mark it done, in one transaction.
        A unit already marked is refused by the units table's key, so it is never written twice."""
        with self._transaction():
            for table, table_rows in rows.items():
                self._insert(check_identifier(table), stage, unit_id, table_rows)
            self._mark(stage, unit_id, "done", None, seconds)

    def forget_units_without_rows(self, stage: str, table: str) -> int:
        """Unmark the done units of ``stage`` that have no rows in ``table`` (a table dropped or
        emptied since), and remove their other rows, so that the sweep computes them again; returns
        how many were unmarked."""
        done = self._db.execute("SELECT unit_id FROM units WHERE stage = ? AND status = 'done'", (stage,))
        present = set(self.tables())
        with_rows: set[str] = set()
        if table in present:
            query = f"SELECT DISTINCT unit_id FROM {check_identifier(table)} WHERE stage = ?"
            with_rows = {r[0] for r in self._db.execute(query, (stage,))}
        missing = [(stage, unit_id) for (unit_id,) in done if unit_id not in with_rows]
        if missing:
            with self._transaction():
                for name in [*present, "units"]:
                    delete = f"DELETE FROM {check_identifier(name)} WHERE stage = ? AND unit_id = ?"
                    self._db.executemany(delete, missing)
        return len(missing)

    def skip(self, stage: str, unit_id: str, reason: str) -> None:
        with self._transaction():
            self._mark(stage, unit_id, "skipped", reason, None)

    def _mark(self, stage: str, unit_id: str, status: str, reason: str | None, seconds: float | None) -> None:
        self._db.execute(
            "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
            (stage, unit_id, status, reason, seconds, time.time()),
        )

    def _insert(self, table: str, stage: str, unit_id: str, rows: Sequence[Row | PlainRow]) -> None:
        if not rows:
            return
        schema, values = table_layout(table, rows)
        columns = ["stage", "unit_id"] + [column for column, _ in schema]
        existing = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
        if not existing:
            spec = ", ".join(
                f"{column} {kind}" for column, kind in [("stage", "TEXT"), ("unit_id", "TEXT"), *schema]
            )
            self._db.execute(f"CREATE TABLE {table} ({spec})")
            self._db.execute(f"CREATE INDEX {table}_unit ON {table} (stage, unit_id)")
        else:
            # A row class that gained a field since the table was made (a new piece of evidence):
            # the rows stored before read NULL there, "not stored", and the run can be extended.
            for column, kind in schema:
                if column not in existing:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        placeholders = ", ".join("?" for _ in columns)
        self._db.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
            [[stage, unit_id, *row] for row in values],
        )
