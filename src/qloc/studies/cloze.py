"""The cloze sweep (``qloc cloze``): every usable query of each fact scored for its answer, one
row per query."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..data.pararel import Fact
from ..data.selection import Selection
from ..engine.cloze import ClozeScore, score_cloze
from ..engine.models import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, LoadedModel
from ..errors import ConfigError, DataError
from ..runs.executors import Execution, ModelSpec, SweepPlan, execute
from ..runs.rows import Row, UnitWriter
from ..runs.store import RunStore
from ..runs.sweep import SkipFact, WorkFn
from ..settings import setting
from .registry import Outcome, Study

STAGE = "cloze"
BATCH_SIZE = 16
SHOWN_ROWS = 40


@dataclass
class ClozeRow(Row):
    """One query's cloze score; the score's fields are columns, but what only editing reads."""

    table = STAGE
    unstored = ("argmax_tokens", "accuracy")
    fact_id: str
    relation: str
    query_index: int
    score: ClozeScore


def cloze_sweep_work(lm: LoadedModel, batch_size: int = BATCH_SIZE) -> WorkFn:
    """Sweep work for ``qloc cloze``: score every usable query of a fact, one row per query."""

    def work(fact: Fact, writer: UnitWriter) -> None:
        try:
            scores = score_cloze(lm, fact.queries, [fact.object] * len(fact.queries), batch_size)
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
        writer.add([ClozeRow(fact.id, fact.relation, i, s) for i, s in enumerate(scores)])

    return work


@dataclass(frozen=True)
class ClozeWorkBuilder:
    """The cloze sweep's :data:`~qloc.runs.executors.WorkBuilder`: each model replica builds
    :func:`cloze_sweep_work` from it (a dataclass, so that Ray pickles it)."""

    batch_size: int = BATCH_SIZE

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return cloze_sweep_work(lm, self.batch_size)


@dataclass(frozen=True)
class ClozeRequest:
    model: str = setting(DEFAULT_MODEL)
    prompt: str | None = setting(None, "Score this prompt (needs --answer) instead of ParaRel queries.")
    answer: str | None = setting(None, "The answer to score after --prompt (a leading space is added).")
    run_dir: Path | None = setting(None, "Store results here (resumable).")
    selection: Selection = setting(factory=lambda: Selection(limit=5))
    device: str = setting(DEFAULT_DEVICE)
    dtype: str = setting(DEFAULT_DTYPE)
    batch_size: int = setting(BATCH_SIZE, "Queries per forward pass.")
    quiet: bool = setting(False)
    json_out: bool = setting(False, "Machine-readable JSON output.", flag="--json")


def run(request: ClozeRequest) -> Outcome:
    if (request.prompt is None) != (request.answer is None):
        raise ConfigError(lambda name: f"{name('prompt')} and {name('answer')} go together")
    model = ModelSpec(request.model, request.device, request.dtype)
    if request.prompt is not None and request.answer is not None:
        score = score_cloze(model.load(), [request.prompt], [request.answer])[0]
        line = (
            f"P({request.answer!r} | {request.prompt!r}) = {score.prob:.4f}, rank {score.rank}, "
            f"log P(answer) = {score.logprob:.4f}, top token {score.top_token!r}"
        )
        return Outcome([line], json=score.to_dict())
    _, selected = request.selection.select()
    params = {"model": request.model, "dtype": request.dtype, **request.selection.params()}
    with contextlib.ExitStack() as scratch:
        # Without a run directory, results go to a temporary run that is removed afterwards.
        directory = request.run_dir or Path(
            scratch.enter_context(tempfile.TemporaryDirectory(prefix="qloc-cloze-"))
        )
        build = ClozeWorkBuilder(request.batch_size)
        plan = SweepPlan(
            directory, STAGE, params, selected, build, model, STAGE, source=request.selection.source
        )
        summary = execute(plan, Execution(quiet=request.quiet or request.json_out))
        with RunStore.open_existing(directory) as store:
            frame = store.frame(STAGE) if STAGE in store.tables() else pd.DataFrame()
    if not frame.empty:
        frame = frame[frame["fact_id"].isin({f.id for f in selected})]
    records = frame.drop(columns=["stage", "unit_id"]).to_dict("records") if not frame.empty else []
    lines: list[str | pd.DataFrame] = ["no queries scored"]
    if not frame.empty:
        top1, mean_prob = 100 * (frame["rank"] == 0).mean(), frame["prob"].mean()
        lines = [
            frame[["fact_id", "prompt", "answer", "prob", "rank", "top_token"]].head(SHOWN_ROWS),
            f"{len(frame)} queries of {frame['fact_id'].nunique()} facts: top-1 {top1:.1f}%, "
            f"mean P(answer) {mean_prob:.4f}",
        ]
    return Outcome([*lines, f"facts: {summary.describe()}"], json_lines=records)


STUDY = Study(
    name="cloze",
    summary="Score answers after cloze prompts: probability and rank of the first answer token and the "
    "teacher-forced log-probability of the whole answer.",
    request=ClozeRequest,
    run=run,
    examples=(
        'qloc cloze --model gemma3-270m --prompt "The Eiffel Tower is located in the city of" '
        "--answer Paris --json",
        "qloc cloze --model smollm2-135m --relations P36,P19 --facts-per-relation 5 --run-dir runs/cloze",
    ),
)
