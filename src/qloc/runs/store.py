"""The run store: one SQLite database per run directory, one transaction per unit of work.

A run directory holds ``qloc.sqlite`` (results, finished units, skips, parameters),
``params.json`` (the parameters of each stage run in it) and ``environment.json`` (model,
library versions, machine). A sweep commits each finished fact in its own transaction, so a
``kill -9`` loses at most the fact in flight; rerunning the same command skips finished facts.
Reopening a stage with different parameters is refused, naming the parameter that differs.

One process writes a run directory at a time: a writer holds :class:`RunLock` (``qloc.lock``)
for its whole sweep, and a second writer is refused at once. Readers take no lock and open the
database read-only, so that analysing a run never changes its directory.

Results tables are created from the first rows written to them (column types from the Python
values; lists and dicts are stored as JSON) and load into pandas with :meth:`RunStore.frame`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from ..errors import RunDirectoryError

STORE_FILE = "qloc.sqlite"
LOCK_FILE = "qloc.lock"
_SQLITE_MAGIC = b"SQLite format 3\x00"
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


def _damaged_store(path: Path, exc: BaseException) -> RunDirectoryError | None:
    """The user-facing error for a store file SQLite cannot read as a database (junk, truncated),
    or None for any other error. ``exc`` may be pandas' wrapper of SQLite's error."""
    if not isinstance(exc, sqlite3.DatabaseError):
        exc = exc.__cause__
    # SQLITE_NOTADB and SQLITE_CORRUPT raise the base class itself; its subclasses
    # (OperationalError, IntegrityError, ...) are about queries, locks and permissions.
    if type(exc) is not sqlite3.DatabaseError:
        return None
    return RunDirectoryError(f"run store {str(path)!r} is not a SQLite database: {exc}")


_Method = TypeVar("_Method", bound=Callable[..., Any])


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


def _refuse_foreign_directory(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"run directory {str(run_dir)!r} is a file")
    # A lock file alone is what a sweep killed before it created its store leaves behind.
    foreign = run_dir.is_dir() and not (run_dir / STORE_FILE).exists()
    if foreign and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirectoryError(
            f"{str(run_dir)!r} is not empty and is not a qloc run directory (no {STORE_FILE}); "
            "choose a new or empty directory"
        )


class RunLock:
    """The right to write a run directory: an exclusive advisory ``flock`` on its ``qloc.lock``,
    which holds the writer's PID. The OS drops the lock when the writer dies, so a killed sweep
    never blocks the next one; a live writer makes a second one fail at once, naming its PID.

    Re-entrant within a process: a sweep takes the lock before it loads its model, and the store
    it opens later shares it. Directories the lock had to create are removed again on release
    where nothing was stored in them, so a command that fails early leaves no folder behind."""

    _held: ClassVar[dict[Path, RunLock]] = {}

    def __init__(self, run_dir: Path, key: Path) -> None:
        self.run_dir = run_dir
        self._key = key
        self._fd: int | None = None
        self._depth = 0
        self._created: list[Path] = []

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        key = Path(run_dir).resolve()
        lock = cls._held.get(key)
        if lock is None:
            lock = cls(Path(run_dir), key)
            lock._take()
            cls._held[key] = lock
        lock._depth += 1
        return lock

    def release(self) -> None:
        self._depth -= 1
        if self._depth:
            return
        del RunLock._held[self._key]
        # Removed while still locked: a process that opened this file meanwhile finds, once it
        # holds the lock, that the path no longer names it, and takes the lock again (see _take).
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / LOCK_FILE).unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take(self) -> None:
        _refuse_foreign_directory(self.run_dir)
        self._created = [d for d in (self.run_dir, *self.run_dir.absolute().parents) if not d.exists()]
        path = self.run_dir / LOCK_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RunDirectoryError(
                        f"run directory {str(self.run_dir)!r} is being written by another qloc process "
                        f"(PID {holder}); wait for it to finish, or choose another run directory"
                    ) from None
                if self._names(path, fd):
                    break
                os.close(fd)
        except OSError as exc:
            self._remove_created()
            raise RunDirectoryError(
                f"cannot write to run directory {str(self.run_dir)!r}: {exc.strerror}"
            ) from None
        except BaseException:
            self._remove_created()
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def _names(path: Path, fd: int) -> bool:
        """Whether ``path`` still names the file open as ``fd`` (its last holder may have removed it)."""
        try:
            return os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _remove_created(self) -> None:
        for directory in self._created:  # deepest first; stops at the first one that holds something
            try:
                directory.rmdir()
            except OSError:
                break


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

    def __exit__(self, *exc) -> None:
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
        query, args = "SELECT * FROM units", ()
        if stage is not None:
            query, args = query + " WHERE stage = ?", (stage,)
        return pd.read_sql_query(query + " ORDER BY finished", self._db, params=args)

    @_reads_store
    def tables(self) -> list[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [r[0] for r in rows if r[0] not in ("stages", "units")]

    @_reads_store
    def frame(self, table: str) -> pd.DataFrame:
        """A results table as a DataFrame (one call: ``RunStore.open_existing(d).frame("cloze")``)."""
        if table not in self.tables():
            raise RunDirectoryError(
                f"run directory {str(self.run_dir)!r} has no table {table!r}; it has {self.tables()}"
            )
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

    def commit_unit(
        self, stage: str, unit_id: str, rows: Mapping[str, Sequence[Mapping[str, Any]]], seconds: float | None
    ) -> None:
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
            "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
            (stage, unit_id, status, reason, seconds, time.time()),
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
