"""The plain per-layer reference of METHODS.md section 3, kept deliberately naive: for each answer
token, each baseline and each layer on its own, a batch of ``steps`` full-sequence forward passes
with that layer's activation at the target position replaced, and one backward. Every faster path
in qloc is tested against this."""

import torch

from qloc.engine.paths import integration_points
from qloc.engine.tokens import encode_query


def _forward_with_replacement(lm, ids, layer, target, values):
    """Logits of ``len(values)`` copies of ``ids`` with layer's activation at ``target`` := values."""

    def pre_hook(module, args):
        hidden = args[0].clone()
        hidden[:, target] = values.to(hidden.dtype)
        return (hidden,) + args[1:]

    handle = lm.mlp_out_proj(layer).register_forward_pre_hook(pre_hook)
    try:
        return lm.model(input_ids=ids.expand(len(values), -1)).logits
    finally:
        handle.remove()


def _activations_at(lm, ids, target):
    """[rows, L, d_ff] activations at ``target`` for each row of ``ids``."""
    recorded = {}
    handles = [
        lm.mlp_out_proj(layer).register_forward_pre_hook(
            lambda m, args, layer=layer: recorded.__setitem__(layer, args[0][:, target].detach().float())
        )
        for layer in range(lm.num_layers)
    ]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([recorded[layer] for layer in range(lm.num_layers)], dim=1)


def _replacement_token(lm, method):
    tok = lm.tokenizer
    if method == "amig":
        return tok.eos_token_id
    return next(t for t in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None)


def reference_token_scores(lm, prompt, answer, method, t, steps=20, rule="right"):
    query = encode_query(lm, prompt, answer)
    target, answer_token = query.target_positions[t], query.answer_ids[t]
    ids = torch.tensor([query.input_ids[: target + 1]])
    alphas, weights = integration_points(steps, rule)
    clean = _activations_at(lm, ids, target)[0]  # [L, d_ff]
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
        baselines = _activations_at(lm, torch.cat(rows), target)
        if method == "amig":
            baselines = baselines.mean(0, keepdim=True)
    per_baseline = torch.zeros((len(baselines),) + clean.shape)
    for b, baseline in enumerate(baselines):
        for layer in range(lm.num_layers):
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


def reference_scores(lm, prompt, answer, method="ig", steps=20, rule="right", answer_tokens="all"):
    """[L, d_ff] scores, averaged over answer tokens (or token 0 only)."""
    count = 1 if answer_tokens == "first" else len(encode_query(lm, prompt, answer).answer_ids)
    return torch.stack(
        [reference_token_scores(lm, prompt, answer, method, t, steps, rule) for t in range(count)]
    ).mean(0)
