"""The sweep loop: units of work (facts, census chunks, sequential-editing runs) against the run
store, with progress and resume, the same wherever the units are computed.

Units already finished in the store are skipped; each finished unit is committed in its own
transaction; a :class:`SkipFact` raised by the work records a counted skip with its reason; an
out-of-memory error stops the sweep with one message naming the unit (finished units stay). Units
are computed by :func:`run_unit`, here (:func:`run_sweep`) or on Ray workers
(:mod:`qloc.runs.executors`), and :func:`drive` writes what comes back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ContextLengthError, QlocError
from .rows import PlainRow, Row, UnitWriter
from .store import RunStore


class Unit(Protocol):
    """A unit of work: a fact, a census chunk, or a (KN set, seed) of sequential editing."""

    @property
    def id(self) -> str: ...

    @property
    def label(self) -> str: ...


WorkFn = Callable[[Any, UnitWriter], None]
"""A sweep's work: computes one unit and adds its rows to the writer."""


def unit_size(unit: Unit) -> int:
    """How far a unit advances the progress bar: its ``size`` (a census chunk's queries) or 1."""
    return int(getattr(unit, "size", 1))


class SkipFact(Exception):
    """Raised by a sweep's work function: the fact cannot be processed.

    ``kind`` groups skips in summaries ("answer not tokenizable"); ``detail`` names the input."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class UnitResult:
    """What computing one unit gave: its rows, why it was skipped, or that memory ran out."""

    status: Literal["done", "skipped", "oom"]
    rows: dict[str, list[Row | PlainRow]] = field(default_factory=dict)
    reason: tuple[str, str] = ("", "")
    """(kind, reason) of a skip; ("out of memory", torch's first line) where memory ran out."""
    seconds: float = 0.0


def run_unit(work: WorkFn, unit: Unit) -> UnitResult:
    """Compute one unit. A query longer than the model's context skips its unit whichever work
    found it; an out-of-memory error is returned, not raised, so a Ray worker can report it."""
    writer = UnitWriter()
    started = time.perf_counter()
    try:
        work(unit, writer)
    except SkipFact as exc:
        return UnitResult("skipped", reason=(exc.kind, str(exc)), seconds=time.perf_counter() - started)
    except ContextLengthError as exc:
        skip = SkipFact("query longer than the model's context", f"{unit.label}: {exc}")
        return UnitResult("skipped", reason=(skip.kind, str(skip)), seconds=time.perf_counter() - started)
    except torch.OutOfMemoryError as exc:
        return UnitResult("oom", reason=("out of memory", str(exc).splitlines()[0]))
    return UnitResult("done", writer.rows, seconds=time.perf_counter() - started)


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    resumed: int = 0
    """Units found finished in the store and not redone."""
    skip_reasons: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    """Units sent to another worker after theirs died (Ray)."""

    def describe(self) -> str:
        reasons = ", ".join(f"{n} {k}" for k, n in self.skip_reasons.items())
        return (
            f"{self.done} done, {self.resumed} already stored, {self.skipped} skipped"
            + (f" ({reasons})" if reasons else "")
            + (f", {self.retried} retried after a worker died" if self.retried else "")
        )


def make_progress(quiet: bool, console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=quiet,
    )


Results = Callable[[list[Any], SweepSummary], Iterator[tuple[Any, UnitResult]]]
"""Computes pending units wherever they run, yielding (unit, result) as each finishes."""


@dataclass(frozen=True)
class Display:
    """How a sweep shows its progress: not at all (quiet), under a description, with its workers."""

    quiet: bool = False
    description: str | None = None
    workers: int | None = None


def drive(
    store: RunStore, stage: str, units: Sequence[Any], results: Results, display: Display
) -> SweepSummary:
    """The one sweep loop: skip finished units, then commit or skip each result as it arrives."""
    summary = SweepSummary()
    finished = store.finished_units(stage)
    pending = [u for u in units if u.id not in finished]
    summary.resumed = len(units) - len(pending)
    on_workers = f" ({display.workers} workers)" if display.workers else ""
    with make_progress(display.quiet) as progress:
        total = sum(map(unit_size, pending))
        task = progress.add_task(display.description or stage, total=total, status="")
        for unit, result in results(pending, summary):
            if result.status == "oom":
                raise QlocError(
                    f"out of memory on {unit.label} ({result.reason[1]}); the {summary.done} units finished "
                    f"in this session are stored in {str(store.run_dir)!r}. Rerun the same command with a "
                    "smaller --max-batch-rows (or --batch-size) to resume."
                )
            if result.status == "done":
                store.commit_unit(stage, unit.id, result.rows, result.seconds)
                summary.done += 1
            else:
                kind, reason = result.reason
                store.skip(stage, unit.id, reason)
                summary.skipped += 1
                summary.skip_reasons[kind] += 1
            status = f"done {summary.done} skipped {summary.skipped}{on_workers}"
            progress.update(task, advance=unit_size(unit), status=status)
    return summary


def run_sweep(
    store: RunStore,
    stage: str,
    units: Sequence[Any],
    work: WorkFn,
    quiet: bool = False,
    description: str | None = None,
) -> SweepSummary:
    """Compute every pending unit in this process, one after another."""

    def here(pending: list[Any], summary: SweepSummary) -> Iterator[tuple[Any, UnitResult]]:
        for unit in pending:
            yield unit, run_unit(work, unit)

    return drive(store, stage, units, here, Display(quiet, description))
