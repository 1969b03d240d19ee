"""Cloze scoring: how strongly a model predicts an answer after a prompt.

For each (prompt, answer): probability and rank of answer token 0 at the last prompt position,
and the teacher-forced log-probability of the whole answer. Softmax runs in fp32 whatever the
model dtype. Queries are scored in right-padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

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
