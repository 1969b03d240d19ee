"""The cloze sweep (``qloc cloze``): every usable query of each fact scored for its answer, one
row per query."""

from __future__ import annotations

from ..data.pararel import Fact
from ..engine.cloze import score_cloze
from ..engine.models import LoadedModel
from ..errors import DataError
from ..runs.store import UnitWriter
from ..runs.sweep import SkipFact


def cloze_sweep_work(lm: LoadedModel, batch_size: int = 16):
    """Sweep work for ``qloc cloze``: score every usable query of a fact, one row per query."""

    def work(fact: Fact, writer: UnitWriter) -> None:
        try:
            scores = score_cloze(lm, fact.queries, [fact.object] * len(fact.queries), batch_size)
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
        writer.add(
            "cloze",
            [
                {
                    "fact_id": fact.id,
                    "relation": fact.relation,
                    "query_index": i,
                    "prompt": s.prompt,
                    "answer": s.answer,
                    "answer_tokens": s.answer_tokens,
                    "prob": s.prob,
                    "rank": s.rank,
                    "logprob": s.logprob,
                    "top_token": s.top_token,
                }
                for i, s in enumerate(scores)
            ],
        )

    return work
