"""Knowledge modification through knowledge neurons (METHODS.md section 5; the paper's eq. 2).

For each KN (l, i) of a set, its value vector v = W_out[:, i] is moved away from the answer's
embedding (erasure) and, for an update, towards the new answer's (Dai et al.'s scaling):

    erase:  v <- v - lambda1 * (||v|| / ||e(o)||) * e(o)
    update: v <- v - lambda1 * (||v|| / ||e(o)||) * e(o) + lambda2 * (||v|| / ||e(o')||) * e(o')

with e(x) the mean input embedding of x's answer tokens. Written for BERT's GELU neurons, whose
activations are (almost) never negative. A gated MLP (Llama, Gemma) has signed activations, and a
neuron with activation a < 0 adds a * v to the residual stream: moving its v away from e(o) then
moves the stream *towards* e(o) and raises the answer. So by default each neuron's change is
multiplied by the sign of its activation (:func:`activation_signs`; 0 leaves it unedited), which
is the literal equation wherever activations are positive.

The change is computed in fp32 whatever the model dtype. :func:`edit_knowledge` is a context
manager that restores every edited weight bit-exactly on exit, also on exceptions; sequential
editing nests them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ..errors import QlocError
from .models import LoadedModel
from .sites import NEURONS
from .tokens import answer_token_ids, encode_query, pad_batch, pad_token_id

LAMBDA1 = 1.0
LAMBDA2 = 2.0
"""Dai et al. used 8 on BERT, whose KN sets hold a few neurons. With the 15-30 KNs of a gated-MLP
model's sets, 8 breaks the model (SmolLM2: median perplexity change 2.8 through Self, 17 through
Union) and edits worse than 2; at 2 the Rel/Gen/Loc average is SmolLM2's best and within 0.02 of
Gemma 3's best, with median perplexity changes under 0.1 (METHODS.md section 5, docs/results)."""
EDIT_SIGNS = ("activation", "none")
"""``activation``: each KN's change times the sign of its activation (the default); ``none``: the
literal equation for every KN."""
Neuron = tuple[int, int]
"""A neuron of the MLP: (layer, index into its d_ff activations)."""


def answer_embedding(lm: LoadedModel, text: str) -> torch.Tensor:
    """e(text): the mean input-embedding row of ``" " + text``'s tokens, fp32 [d_model]."""
    ids = answer_token_ids(lm, text)
    weight = lm.model.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].float().mean(0)


@torch.no_grad()
def target_activations(lm: LoadedModel, prompts: Sequence[str], answer: str) -> torch.Tensor:
    """[prompts, L, d_ff] fp32 neuron activations at each prompt's target position (where the
    answer's first token is predicted), one unpadded forward per prompt."""
    rows = []
    for prompt in prompts:
        query = encode_query(lm, prompt, answer)
        target = query.target_positions[0]
        ids = torch.tensor([list(query.input_ids[: target + 1])], device=lm.device)
        with NEURONS.record(lm, positions=torch.tensor([target])) as acts:
            lm.model(input_ids=ids, logits_to_keep=1)
        rows.append(torch.stack([acts[layer][0].float().cpu() for layer in range(lm.num_layers)]))
    return torch.stack(rows)


def activation_signs(activations: torch.Tensor, neurons: Sequence[Neuron]) -> list[int]:
    """Per neuron, the sign (-1, 0, +1) of its mean activation over the rows of ``activations``
    ([queries, L, d_ff]): of the edited query alone for a Self set, over the fact's queries for
    Union and CAS sets."""
    mean = activations.mean(0)
    return [int(torch.sign(mean[layer, index])) for layer, index in neurons]


@contextlib.contextmanager
def edit_knowledge(
    lm: LoadedModel,
    neurons: Sequence[Neuron],
    erase: str,
    new: str | None = None,
    lambda1: float = LAMBDA1,
    lambda2: float = LAMBDA2,
    signs: Sequence[int] | None = None,
    norms: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Erase ``erase`` (and write ``new`` where given) through the value vectors of ``neurons``.

    ``signs`` (one per neuron, from :func:`activation_signs`) multiplies each neuron's change;
    a neuron with sign 0 is left as it is. ``None`` applies the literal equation to every neuron.
    ``norms`` (per layer, [d_ff]; :func:`value_norms` of the unedited model) scales each change;
    ``None``: the value vectors' norms as they are now. Edits made one after another pass the
    unedited norms, so that a neuron edited k times changes k times as much, not (1 + lambda)^k."""
    if signs is not None and len(signs) != len(neurons):
        raise QlocError(f"{len(signs)} signs for {len(neurons)} neurons")
    e_old = answer_embedding(lm, erase)
    e_new = answer_embedding(lm, new) if new is not None else None
    by_layer: dict[int, dict[int, int]] = {}
    for k, (layer, index) in enumerate(neurons):
        sign = 1 if signs is None else int(signs[k])
        if sign:
            by_layer.setdefault(int(layer), {})[int(index)] = sign
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for layer, sign_of in by_layer.items():
                vectors = lm.value_vectors(layer)
                indices = sorted(sign_of)
                rows = torch.tensor(indices, device=vectors.device)
                saved[layer] = (rows, vectors[rows].clone())
                v = vectors[rows].float()
                scale = v.norm(dim=1, keepdim=True) if norms is None else norms[layer][rows][:, None]
                change = -lambda1 * scale / e_old.norm() * e_old.to(v.device)
                if e_new is not None:
                    change = change + lambda2 * scale / e_new.norm() * e_new.to(v.device)
                direction = torch.tensor([float(sign_of[i]) for i in indices], device=v.device)[:, None]
                vectors[rows] = (v + direction * change).to(vectors.dtype)
        yield
    finally:
        with torch.no_grad():
            for layer, (rows, original) in saved.items():
                lm.value_vectors(layer)[rows] = original


@torch.no_grad()
def neuron_footprints(lm: LoadedModel, passages: Sequence[str], max_tokens: int = 256) -> torch.Tensor:
    """[L, d_ff] fp32: per neuron, ||v|| x the mean |activation| over every token of ``passages``
    (each cut to its first ``max_tokens`` tokens): how much the neuron writes into the residual
    stream on generic text, whatever the query. An edit of v reaches every token in proportion to
    it (METHODS.md section 5, activity filter). Sums are kept per layer as the passages run, one
    at a time, so the memory is that of one forward pass."""
    totals = torch.zeros(lm.num_layers, lm.d_ff)
    tokens = 0

    def accumulate(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(tensor: torch.Tensor) -> torch.Tensor:
            totals[layer] += tensor.detach().float().abs().sum(dim=(0, 1)).cpu()
            return tensor

        return fn

    with NEURONS.replace(lm, {layer: accumulate(layer) for layer in range(lm.num_layers)}):
        for passage in passages:
            ids = lm.tokenizer(passage).input_ids[:max_tokens]
            lm.model(input_ids=torch.tensor([ids], device=lm.device), logits_to_keep=1)
            tokens += len(ids)
    if tokens == 0:
        raise QlocError("no tokens to measure neuron activity on")
    norms = torch.stack([norm.cpu() for norm in value_norms(lm).values()])
    return totals / tokens * norms


def most_active(footprints: torch.Tensor, share: float) -> frozenset[Neuron]:
    """The ``share`` of all neurons (rounded up) with the largest ``footprints``."""
    count = math.ceil(share * footprints.numel())
    if count == 0:
        return frozenset()
    flat = torch.topk(footprints.flatten(), count).indices
    d_ff = footprints.shape[1]
    return frozenset((int(i) // d_ff, int(i) % d_ff) for i in flat)


@torch.no_grad()
def value_norms(lm: LoadedModel) -> dict[int, torch.Tensor]:
    """Per layer, the norm of every neuron's value vector ([d_ff], float32, on the model's device):
    the scale of :func:`edit_knowledge` in a sequence of edits."""
    return {layer: lm.value_vectors(layer).float().norm(dim=1) for layer in range(lm.num_layers)}


@torch.no_grad()
def perplexity(
    lm: LoadedModel, passages: Sequence[str], max_tokens: int = 256, positions_per_chunk: int = 32
) -> float:
    """Perplexity over passages, each cut to its first ``max_tokens`` tokens (one batch).

    The output head runs on ``positions_per_chunk`` positions at a time: the full
    [passages, tokens, vocabulary] logits of a 262k-vocabulary model would take over a GB."""
    sequences = [tuple(lm.tokenizer(p).input_ids[:max_tokens]) for p in passages]
    batch = pad_batch(sequences, pad_token_id(lm), lm.device)
    captured: dict[str, torch.Tensor] = {}
    handle = lm.final_norm.register_forward_pre_hook(
        lambda module, args: captured.setdefault("hidden", args[0])
    )
    try:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    finally:
        handle.remove()
    hidden, targets, mask = (
        captured["hidden"][:, :-1],
        batch.input_ids[:, 1:],
        batch.attention_mask[:, 1:].bool(),
    )
    total = 0.0
    for start in range(0, hidden.shape[1], positions_per_chunk):
        part = slice(start, start + positions_per_chunk)
        logprobs = torch.log_softmax(lm.logits_from_final_hidden(hidden[:, part]).float(), -1)
        total += float(logprobs.gather(2, targets[:, part, None])[..., 0][mask[:, part]].sum())
    return math.exp(-total / int(mask.sum()))
