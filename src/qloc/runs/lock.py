"""One writer per run directory: :class:`RunLock`."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import ClassVar

from ..errors import RunDirectoryError

STORE_FILE = "qloc.sqlite"
LOCK_FILE = "qloc.lock"


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
        try:
            key = Path(run_dir).resolve()
        except RuntimeError:  # pathlib's symlink loop (Python < 3.13)
            raise RunDirectoryError(f"run directory {str(run_dir)!r} is a symbolic link loop") from None
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
        if self._fd is not None:
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
