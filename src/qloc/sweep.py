"""Running a unit of work per fact against the run store, with progress and resume.

Every sweep command (cloze, localize, edit, ...) is ``run_sweep(store, stage, facts, work)``:
facts already finished in the store are skipped, each finished fact is committed in its own
transaction, a :class:`SkipFact` raised by ``work`` records a counted skip with its reason, and
an out-of-memory error stops the sweep with a message naming the fact (finished facts stay).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import QlocError
from .pararel import Fact
from .store import RunStore, UnitWriter


class SkipFact(Exception):
    """Raised by a sweep's work function: the fact cannot be processed.

    ``kind`` groups skips in summaries ("answer not tokenizable"); ``detail`` names the input."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    resumed: int = 0
    """Facts found finished in the store and not redone."""
    skip_reasons: Counter = field(default_factory=Counter)


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
    facts: Sequence[Fact],
    work: Callable[[Fact, UnitWriter], None],
    quiet: bool = False,
    description: str | None = None,
) -> SweepSummary:
    summary = SweepSummary()
    finished = store.finished_units(stage)
    pending = [f for f in facts if f.id not in finished]
    summary.resumed = len(facts) - len(pending)
    with make_progress(quiet) as progress:
        task = progress.add_task(description or stage, total=len(pending), status="")
        for fact in pending:
            try:
                with store.unit(stage, fact.id) as writer:
                    work(fact, writer)
                summary.done += 1
            except SkipFact as exc:
                store.skip(stage, fact.id, str(exc))
                summary.skipped += 1
                summary.skip_reasons[exc.kind] += 1
            except torch.OutOfMemoryError:
                raise QlocError(
                    f"out of memory on fact {fact.id} ({fact.subject!r} / {fact.object!r}); the "
                    f"{summary.done} facts finished in this session are stored in {str(store.run_dir)!r}. "
                    "Rerun the same command with a smaller --batch-size to resume."
                ) from None
            progress.update(task, advance=1, status=f"done {summary.done} skipped {summary.skipped}")
    return summary

