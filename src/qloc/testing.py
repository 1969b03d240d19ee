"""A reference for tests and benchmarks, not for production use.

The plain per-layer reference of METHODS.md section 3, kept deliberately naive: for each answer
token, each baseline and each layer on its own, a batch of ``steps`` full-sequence forward passes
with that layer's activation at the target position replaced, and one backward. Every faster path
in qloc is tested against this, and the benchmarks time it beside the engine. It is slow by design
(one full-depth batch per layer) and holds every intermediate: use :func:`qloc.attribute`.

``layers`` limits the scores to the first layers (the benchmarks time a few and extrapolate); each
still runs the model's full depth, so its cost per layer is that of the full computation.
"""

from __future__ import annotations

from typing import Any

import torch

from qloc.engine.attribution import DEFAULT_STEPS
from qloc.engine.models import LoadedModel
from qloc.engine.paths import integration_points
from qloc.engine.tokens import encode_query

__all__ = ["reference_scores", "reference_token_scores"]


def _forward_with_replacement(
    lm: LoadedModel, ids: torch.Tensor, layer: int, target: int, values: torch.Tensor
) -> torch.Tensor:
    """Logits of ``len(values)`` copies of ``ids`` with layer's activation at ``target`` := values."""

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0].clone()
        hidden[:, target] = values.to(hidden.dtype)
        return (hidden,) + args[1:]

    handle = lm.mlp_out_proj(layer).register_forward_pre_hook(pre_hook)
    try:
        logits: torch.Tensor = lm.model(input_ids=ids.expand(len(values), -1)).logits
        return logits
    finally:
        handle.remove()


def _activations_at(lm: LoadedModel, ids: torch.Tensor, target: int, layers: int) -> torch.Tensor:
    """[rows, layers, d_ff] activations at ``target`` for each row of ``ids``."""
    recorded: dict[int, torch.Tensor] = {}

    def record(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            recorded[layer] = args[0][:, target].detach().float()

        return hook

    handles = [lm.mlp_out_proj(layer).register_forward_pre_hook(record(layer)) for layer in range(layers)]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([recorded[layer] for layer in range(layers)], dim=1)


def _replacement_token(lm: LoadedModel, method: str) -> int:
    tok = lm.tokenizer
    if method == "amig":
        return int(tok.eos_token_id)
    return int(next(t for t in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None))


def reference_token_scores(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    method: str,
    t: int,
    steps: int = DEFAULT_STEPS,
    rule: str = "right",
    layers: int | None = None,
) -> torch.Tensor:
    """[layers, d_ff] scores of answer token ``t`` (layers: all of the model's unless given)."""
    layers = lm.num_layers if layers is None else layers
    query = encode_query(lm, prompt, answer)
    target, answer_token = query.target_positions[t], query.answer_ids[t]
    ids = torch.tensor([query.input_ids[: target + 1]])
    alphas, weights = integration_points(steps, rule)
    clean = _activations_at(lm, ids, target, layers)[0]  # [layers, d_ff]
    if method == "ig":
        baselines = torch.zeros((1,) + clean.shape)
    else:
        replacement = _replacement_token(lm, method)
        rows = []
        for j, special in enumerate(query.prompt_special):
            if not special:
                modified = ids.clone()
                modified[0, j] = replacement
                rows.append(modified)
        baselines = _activations_at(lm, torch.cat(rows), target, layers)
        if method == "amig":
            baselines = baselines.mean(0, keepdim=True)
    per_baseline = torch.zeros((len(baselines),) + clean.shape)
    for b, baseline in enumerate(baselines):
        for layer in range(layers):
            start, end = baseline[layer], clean[layer]
            points = (start + alphas[:, None] * (end - start)).requires_grad_(True)
            logits = _forward_with_replacement(lm, ids, layer, target, points)
            probs = torch.softmax(logits[:, target].float(), -1)[:, answer_token]
            (grad,) = torch.autograd.grad(probs.sum(), points)
            per_baseline[b, layer] = (end - start) * (weights[:, None] * grad).sum(0)
    if method != "sig":
        return per_baseline[0]
    norms = [p.norm() for p in per_baseline]
    unit = torch.stack([p / n for p, n in zip(per_baseline, norms) if n > 0]).sum(0)
    return unit * torch.stack([n for n in norms if n > 0]).mean()


def reference_scores(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    method: str = "ig",
    steps: int = DEFAULT_STEPS,
    rule: str = "right",
    answer_tokens: str = "all",
    layers: int | None = None,
) -> torch.Tensor:
    """[layers, d_ff] scores, averaged over answer tokens (or token 0 only). SIG normalises over the
    layers computed, so with ``layers`` below the model's depth its scores are not the engine's."""
    count = 1 if answer_tokens == "first" else len(encode_query(lm, prompt, answer).answer_ids)
    return torch.stack(
        [reference_token_scores(lm, prompt, answer, method, t, steps, rule, layers) for t in range(count)]
    ).mean(0)
