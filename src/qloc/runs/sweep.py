"""Running a unit of work (usually a fact) against the run store, with progress and resume.

Every sweep command (cloze, localize, edit, ...) is ``run_sweep(store, stage, facts, work)``:
facts already finished in the store are skipped, each finished fact is committed in its own
transaction, a :class:`SkipFact` raised by ``work`` records a counted skip with its reason, and
an out-of-memory error stops the sweep with a message naming the fact (finished facts stay).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

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
from .store import RunStore, UnitWriter


class Unit(Protocol):
    """A unit of work: a fact, or a (KN set, seed) of sequential editing."""

    id: str

    @property
    def label(self) -> str: ...


U = TypeVar("U", bound=Unit)


def unit_size(unit: Unit) -> int:
    """How far a unit advances the progress bar: its ``size`` (a census chunk's queries) or 1."""
    return getattr(unit, "size", 1)


class SkipFact(Exception):
    """Raised by a sweep's work function: the fact cannot be processed.

    ``kind`` groups skips in summaries ("answer not tokenizable"); ``detail`` names the input."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def unit_skip(unit: Unit, exc: SkipFact | ContextLengthError) -> SkipFact:
    """The skip an exception from a unit's work stands for: work functions raise :class:`SkipFact`,
    and a query longer than the model's context skips its unit whichever work found it."""
    if isinstance(exc, SkipFact):
        return exc
    return SkipFact("query longer than the model's context", f"{unit.label}: {exc}")


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    resumed: int = 0
    """Facts found finished in the store and not redone."""
    skip_reasons: Counter = field(default_factory=Counter)
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


def run_sweep(
    store: RunStore,
    stage: str,
    units: Sequence[U],
    work: Callable[[U, UnitWriter], None],
    quiet: bool = False,
    description: str | None = None,
) -> SweepSummary:
    summary = SweepSummary()
    finished = store.finished_units(stage)
    pending = [u for u in units if u.id not in finished]
    summary.resumed = len(units) - len(pending)
    with make_progress(quiet) as progress:
        task = progress.add_task(description or stage, total=sum(map(unit_size, pending)), status="")
        for unit in pending:
            try:
                with store.unit(stage, unit.id) as writer:
                    work(unit, writer)
                summary.done += 1
            except (SkipFact, ContextLengthError) as exc:
                skip = unit_skip(unit, exc)
                store.skip(stage, unit.id, str(skip))
                summary.skipped += 1
                summary.skip_reasons[skip.kind] += 1
            except torch.OutOfMemoryError:
                raise QlocError(
                    f"out of memory on {unit.label}; the {summary.done} units finished in this session are "
                    f"stored in {str(store.run_dir)!r}. Rerun the same command with a smaller --max-batch-rows "
                    "(or --batch-size) to resume."
                ) from None
            progress.update(
                task, advance=unit_size(unit), status=f"done {summary.done} skipped {summary.skipped}"
            )
    return summary
