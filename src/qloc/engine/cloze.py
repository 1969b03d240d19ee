"""Cloze scoring: how strongly a model predicts an answer after a prompt.

:func:`score_cloze`: for each (prompt, answer), probability and rank of answer token 0 at the last
prompt position, and the teacher-forced log-probability of the whole answer; queries are scored in
right-padded batches. Softmax runs in fp32 whatever the model dtype.

:class:`FirstTokenScorer`: rank and probability of answer token 0 only, for many prompts at once
(the census, METHODS.md section 9). Only the prompt is read, prompts are grouped by exact length so
that a batch holds no padding, and only the last position goes through the output head.
Precision: ``float32`` scores everything in fp32. ``bfloat16`` runs a bf16 copy of the model and
re-scores in fp32 every query whose answer logit lies within a calibrated margin of the
``EXACT_RANKS``-th best logit, so that every rank below ``EXACT_RANKS`` (and so top-1 and top-10
membership) is the fp32 one; the margin is twice the worst bf16 error of logit differences seen on
a calibration sample, plus a floor. ``auto`` is float32 on CPUs (bf16 with the re-scoring is slower
there: benchmarks/NOTES.md) and bfloat16 on GPUs that support it.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError, DataError, QlocError
from .models import LoadedModel
from .tokens import EncodedQuery, encode_query, pad_batch, pad_token_id


@dataclass(frozen=True)
class ClozeScore:
    prompt: str
    answer: str
    answer_tokens: list[int]
    prob: float
    """P(answer token 0 | prompt)."""
    rank: int
    """Rank of answer token 0 among the vocabulary, 0 = top-1."""
    logprob: float
    """Teacher-forced log P(all answer tokens | prompt)."""
    top_token: str
    """The model's top-1 next token after the prompt."""
    argmax_tokens: list[int]
    """The model's argmax token at each answer token's target position (teacher forced)."""
    accuracy: float
    """Share of answer tokens that are the argmax: METHODS.md section 5's acc(x, y)."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def score_cloze(
    lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> list[ClozeScore]:
    """Score ``answers[i]`` after ``prompts[i]`` for every i."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    encoded = [encode_query(lm, p, a) for p, a in zip(prompts, answers)]
    scores: list[ClozeScore] = []
    for start in range(0, len(encoded), batch_size):
        scores.extend(_score_batch(lm, encoded[start : start + batch_size]))
    return scores


def _score_batch(lm: LoadedModel, queries: list[EncodedQuery]) -> list[ClozeScore]:
    batch = pad_batch([q.input_ids for q in queries], pad_token_id(lm), lm.device)
    logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    results = []
    for row, query in enumerate(queries):
        positions = torch.tensor(query.target_positions, device=logits.device)
        logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
        answer = torch.tensor(query.answer_ids, device=logits.device)
        answer_logprobs = logprobs.gather(1, answer[:, None])[:, 0]
        first = logprobs[0]
        argmax = logprobs.argmax(-1)
        results.append(
            ClozeScore(
                prompt=query.prompt,
                answer=query.answer,
                answer_tokens=list(query.answer_ids),
                prob=float(answer_logprobs[0].exp()),
                rank=int((first > first[answer[0]]).sum()),
                logprob=float(answer_logprobs.sum()),
                top_token=lm.tokenizer.decode([int(first.argmax())]),
                argmax_tokens=argmax.tolist(),
                accuracy=float((argmax == answer).float().mean()),
            )
        )
    return results


PRECISIONS = ("auto", "float32", "bfloat16")
EXACT_RANKS = 10
"""bfloat16 census: a rank below this is the fp32 rank; a larger one is bf16's (approximate)."""
MARGIN_FLOOR = 0.5
"""Logits added to the calibrated bf16 margin, for errors larger than any in the sample."""


@dataclass(frozen=True)
class FirstTokenScore:
    rank: int
    """Rank of the answer's first token among the vocabulary, 0 = top-1 (ties rank best)."""
    prob: float
    """P(answer token 0 | prompt), softmax in fp32."""
    top_token: int
    """The model's top-1 next token."""
    scored_in: str
    """float32, or bfloat16 where the bf16 numbers were kept (rank >= EXACT_RANKS for certain)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> the faster of the exact modes on ``device``; float32 and bfloat16 stay."""
    if precision not in PRECISIONS:
        raise ConfigError.invalid("precision", precision, f"choose {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


class FirstTokenScorer:
    """Rank and probability of answer token 0 after many prompts, batched by prompt length.

    ``lm`` must hold float32 weights (the reference every precision is exact against). With
    ``precision="bfloat16"`` a bf16 copy of the model is made and ``calibration`` (prompt ids,
    answer token) pairs set the margin inside which a query is re-scored in fp32."""

    def __init__(
        self,
        lm: LoadedModel,
        precision: str = "float32",
        batch_size: int = 128,
        calibration: Sequence[tuple[Sequence[int], int]] = (),
    ) -> None:
        if lm.dtype != torch.float32:
            raise QlocError(f"the census scores against float32 weights; {lm.name!r} is loaded in {lm.dtype}")
        if batch_size < 1:
            raise ConfigError.invalid("batch_size", batch_size, "must be at least 1")
        self.lm, self.batch_size = lm, batch_size
        self.precision = resolve_precision(precision, lm.device)
        self.fast_model = None
        self.margin = math.nan
        self.calibrated_error = math.nan
        if self.precision == "bfloat16":
            if not calibration:
                raise QlocError("a bfloat16 census needs calibration queries to set its fp32 margin")
            self.fast_model = copy.deepcopy(lm.model).to(torch.bfloat16)
            self.calibrated_error = self._calibrate(calibration)
            self.margin = 2 * self.calibrated_error + MARGIN_FLOOR

    @torch.inference_mode()
    def _calibrate(self, calibration: Sequence[tuple[Sequence[int], int]]) -> float:
        """The worst error of any logit difference (max minus min of bf16 - fp32 over the
        vocabulary: a shift common to all logits changes no rank) on the calibration queries."""
        assert self.fast_model is not None
        worst = 0.0
        prompts = [ids for ids, _ in calibration]
        for rows in self._batches(prompts):
            ids = torch.tensor([prompts[i] for i in rows], device=self.lm.device)
            error = _last_logits(self.fast_model, ids) - _last_logits(self.lm.model, ids)
            worst = max(worst, float((error.max(1).values - error.min(1).values).max()))
        return worst

    def _batches(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Row indices grouped by exact prompt length (no padding), at most batch_size per batch."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(prompts):
            if not ids:
                raise DataError(f"prompt {index} tokenizes to no tokens")
            by_length[len(ids)].append(index)
        return [
            rows[start : start + self.batch_size]
            for _, rows in sorted(by_length.items())
            for start in range(0, len(rows), self.batch_size)
        ]

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], answer_tokens: Sequence[int]) -> list[FirstTokenScore]:
        """Score ``answer_tokens[i]`` after the token ids ``prompts[i]`` (special tokens included)."""
        if len(prompts) != len(answer_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(answer_tokens)} answer tokens")
        results: dict[int, FirstTokenScore] = {}
        for rows in self._batches(prompts):
            ids = torch.tensor([prompts[i] for i in rows], device=self.lm.device)
            answers = torch.tensor([answer_tokens[i] for i in rows], device=self.lm.device)
            results.update(zip(rows, self._score_batch(ids, answers)))
        return [results[row] for row in range(len(prompts))]

    def _score_batch(self, ids: torch.Tensor, answers: torch.Tensor) -> list[FirstTokenScore]:
        if self.fast_model is None:
            return _first_token_scores(_last_logits(self.lm.model, ids), answers, "float32")
        logits = _last_logits(self.fast_model, ids)
        answer_logit = logits.gather(1, answers[:, None])[:, 0]
        # Below the EXACT_RANKS-th logit by more than the margin: at least EXACT_RANKS tokens beat
        # the answer in fp32 too, so its rank is >= EXACT_RANKS in both precisions.
        boundary = logits.topk(EXACT_RANKS, dim=1).values[:, -1]
        recheck = (answer_logit >= boundary - self.margin).nonzero()[:, 0]
        results = _first_token_scores(logits, answers, "bfloat16")
        if len(recheck):
            exact_logits = _last_logits(self.lm.model, ids[recheck])
            exact = _first_token_scores(exact_logits, answers[recheck], "float32")
            for row, result in zip(recheck.tolist(), exact):
                results[row] = result
        return results


def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [batch, vocab] at the last position; only that position reaches the head."""
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def _first_token_scores(logits: torch.Tensor, answers: torch.Tensor, scored_in: str) -> list[FirstTokenScore]:
    # Rank on log-probabilities, as score_cloze computes it, so both agree on near-ties.
    logprobs = torch.log_softmax(logits, dim=-1)
    answer_logprob = logprobs.gather(1, answers[:, None])
    ranks = (logprobs > answer_logprob).sum(1).tolist()
    probs = answer_logprob[:, 0].exp().tolist()
    tops = logprobs.argmax(1).tolist()
    return [FirstTokenScore(r, p, t, scored_in) for r, p, t in zip(ranks, probs, tops)]
