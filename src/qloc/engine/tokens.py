"""Turning (prompt, answer) pairs into token ids and target positions (METHODS.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ContextLengthError, DataError
from .models import LoadedModel


@dataclass(frozen=True)
class EncodedQuery:
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    prompt_special: tuple[bool, ...]
    """Per prompt token: added by the tokenizer itself (BOS), not part of the prompt's words."""

    @property
    def input_ids(self) -> tuple[int, ...]:
        """Prompt followed by all answer tokens but the last (teacher forcing)."""
        return self.prompt_ids + self.answer_ids[:-1]

    @property
    def target_positions(self) -> tuple[int, ...]:
        """Position whose next-token distribution predicts answer token t, for each t."""
        first = len(self.prompt_ids) - 1
        return tuple(range(first, first + len(self.answer_ids)))


def encode_query(lm: LoadedModel, prompt: str, answer: str) -> EncodedQuery:
    """Prompt with the tokenizer's own special tokens; answer with a leading space and none."""
    if lm.tokenizer is None:
        raise DataError(f"model {lm.name!r} has no tokenizer")
    encoded = lm.tokenizer(prompt, return_special_tokens_mask=True)
    prompt_ids = tuple(encoded["input_ids"])
    answer_ids = answer_token_ids(lm, answer)
    if not prompt_ids:
        raise DataError(f"prompt {prompt!r} tokenizes to no tokens with {lm.name!r}'s tokenizer")
    special = tuple(bool(x) for x in encoded.get("special_tokens_mask", [0] * len(prompt_ids)))
    query = EncodedQuery(prompt, answer, prompt_ids, answer_ids, special)
    context = getattr(lm.config, "max_position_embeddings", None)
    if context is not None and len(query.input_ids) > context:
        # Positions past the context give meaningless scores rather than an error: refuse them.
        shown = prompt if len(prompt) <= 60 else prompt[:60] + "..."
        raise ContextLengthError(
            f"prompt {shown!r} ({len(prompt)} characters) with its answer is {len(query.input_ids)} tokens, "
            f"longer than the {context}-token context of {lm.name!r}"
        )
    return query


def answer_token_ids(lm: LoadedModel, answer: str) -> tuple[int, ...]:
    """``tokenizer(" " + answer)`` without special tokens: the leading space makes the answer a
    continuation word, as it is after a prompt."""
    ids = (
        tuple(lm.tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids)
        if answer.strip()
        else ()
    )
    if not ids:
        raise DataError(f"answer {answer!r} tokenizes to no tokens with {lm.name!r}'s tokenizer")
    return ids


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pad_batch(sequences: list[tuple[int, ...]], pad_id: int, device: torch.device) -> Batch:
    """Right-pad so every row keeps positions 0..len-1 (causal attention never sees the padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(ids.to(device), mask.to(device))


def pad_token_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
