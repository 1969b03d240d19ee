"""The localization sweep (``qloc localize``): KN sets of every usable query of every fact.

Unit of work = one fact. For each method, each usable query is attributed, its KN set (METHODS.md
section 3) and top scores are stored, and the fact's Consistency-Aware KN set (section 8) is
computed from the same per-query scores, so editing needs no second attribution pass. Dense
scores are kept only with ``save_scores`` (fp16, compressed): a full ParaRel sweep of an 8B model
has about 2 million (query, method) pairs.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ..data.pararel import Fact
from ..engine.attribution import METHODS, attribute
from ..engine.cloze import score_cloze
from ..engine.models import LoadedModel
from ..engine.paths import integration_points
from ..errors import DataError, QlocError
from ..runs.store import UnitWriter
from ..runs.sweep import SkipFact
from .knsets import cas_set

STAGE = "localize"


@dataclass(frozen=True)
class LocalizeConfig:
    methods: tuple[str, ...] = ("ig", "amig", "sig")
    steps: int = 20
    rule: str = "right"
    answer_tokens: str = "first"
    threshold: float = 0.2
    """KN set: score >= threshold * max score (Dai et al.)."""
    top_k: int | None = None
    """KN set: the k best neurons instead of the threshold."""
    cas_beta1: float = 1.0
    cas_beta2: float = 1.0
    cas_threshold: float = 0.3
    top_scores: int = 20
    """How many of each query's best (layer, neuron, score) are stored."""
    save_scores: bool = False

    def __post_init__(self) -> None:
        """Reject bad options before they are stored as the run's parameters."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise QlocError(f"--methods {','.join(self.methods)}: choose from {', '.join(METHODS)}")
        integration_points(self.steps, self.rule)  # raises on a bad --steps or --rule
        if self.answer_tokens not in ("all", "first"):
            raise QlocError(f"--answer-tokens {self.answer_tokens!r}: choose all or first")
        if not 0 < self.threshold <= 1:
            raise QlocError(f"--threshold {self.threshold}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise QlocError(f"--top-k {self.top_k}: must be at least 1")

    def params(self) -> dict:
        return {**asdict(self), "methods": list(self.methods)}


def localize_work(lm: LoadedModel, config: LocalizeConfig, max_batch_rows: int | None = None):
    """The per-fact work function for :func:`qloc.sweep.run_sweep`."""

    def work(fact: Fact, writer: UnitWriter) -> None:
        try:
            cloze = score_cloze(lm, fact.queries, [fact.object] * len(fact.queries))
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
        for method in config.methods:
            per_query = []
            for index, (prompt, knows) in enumerate(zip(fact.queries, cloze)):
                started = time.perf_counter()
                with warnings.catch_warnings():
                    # The residual is stored with every query; per-query warnings would flood a sweep.
                    warnings.simplefilter("ignore", UserWarning)
                    result = attribute(
                        lm,
                        prompt,
                        fact.object,
                        method,
                        steps=config.steps,
                        rule=config.rule,
                        answer_tokens=config.answer_tokens,
                        max_batch_rows=max_batch_rows,
                    )
                per_query.append(result.scores)
                kn = result.kn_set(config.threshold, config.top_k)
                writer.add(
                    "kn_sets",
                    {
                        "fact_id": fact.id,
                        "relation": fact.relation,
                        "method": method,
                        "query_index": index,
                        "prompt": prompt,
                        "answer": fact.object,
                        "kn": [list(u) for u in kn],
                        "kn_size": len(kn),
                        "max_score": float(result.scores.max()),
                        "top": [[l, i, round(v, 8)] for l, i, v in result.top(config.top_scores)],
                        "prob": knows.prob,
                        "rank": knows.rank,
                        "f_input": float(result.f_input[0]),
                        "max_residual": float(result.completeness_residual.max()),
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
                if config.save_scores:
                    writer.add(
                        "dense_scores",
                        {
                            "fact_id": fact.id,
                            "method": method,
                            "query_index": index,
                            "scores_npz": _compress(result.scores.numpy()),
                        },
                    )
            cas = cas_set(per_query, config.cas_beta1, config.cas_beta2, config.cas_threshold)
            writer.add(
                "cas_sets",
                {
                    "fact_id": fact.id,
                    "relation": fact.relation,
                    "method": method,
                    "kn": [list(u) for u in cas],
                    "kn_size": len(cas),
                },
            )

    return work


def _compress(scores: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, scores=scores.astype(np.float16))
    return buffer.getvalue()


def load_dense_scores(blob: bytes) -> np.ndarray:
    """The [L, d_ff] fp16 scores stored by ``--save-scores``."""
    return np.load(io.BytesIO(blob))["scores"]
