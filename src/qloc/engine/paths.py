"""The path integrator behind every attribution method, for neurons and attention alike.

For one answer token and a site (:mod:`qloc.engine.sites`), each layer l on its own has its site
tensor moved along straight paths from start points s_l (the baselines) to its clean value v_l,
and the integrator returns, per start point and layer, sum_k w_k dF(s_l + alpha_k (v_l - s_l)) /
dv_l and F at the path's start (METHODS.md sections 3 and 7).

How it is computed fast. A path point of layer l changes nothing below layer l, so the integrator
runs the clean input once, records how the stock forward calls each decoder layer (hidden state
in, mask, position embeddings) and its site tensors, and then pushes (layer, start point, step)
rows as one batch through the stock decoder-layer modules, each row joining at its own layer from
that layer's clean input and replacing the site tensor there; one backward gives every gradient.
Where the site acts at the target position only (neurons), the positions before it are the same
for every row too: they are run once into a KV cache that every row shares, and a row carries the
target position alone. Attention at layer l changes every position from layer l up, so its rows
carry the whole prompt. Only the output head (final norm, unembedding, soft-capping) is applied
by qloc, from the architecture table.

Rows are ordered by layer and cut into chunks of at most ``max_batch_rows`` (default: what
:func:`default_batch_rows` estimates fits); within a chunk the batch grows as it climbs.

The one-step right rule (the first-order methods, gxa) needs no path rows for its gradients: the
clean run itself, kept on the graph at every layer, gives dF/dv_l for all layers in one backward
(:meth:`PathIntegrator.clean_run` with ``gradients``); only F at the start points, for the
completeness check, takes one replayed row per layer (:meth:`PathIntegrator.input_gradients`).
Such a pass reads every weight for one row, so several queries whose prompts have the same length
share it (:meth:`PathIntegrator.clean_batch`: one batch row per query, no padding), and their
replayed rows share one batch too, each row carrying the layer inputs and prefix cache of its own
query.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..errors import ConfigError
from .models import LoadedModel
from .sites import Site, SiteFn

RULES = ("right", "midpoint", "gauss")
CPU_ROW_TOKENS = 1024
"""Token positions per chunk on a CPU: larger chunks gain nothing there and cost memory."""
ESTIMATED_PROMPT_TOKENS = 64
"""Positions of keys and values a row is budgeted for on a GPU (its prefix cache, or its own)."""


def integration_points(steps: int, rule: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha_k in (0, 1] and weights w_k with sum_k w_k g(alpha_k) ~ integral_0^1 g.

    ``right``: alpha_k = k/m, w_k = 1/m (Dai et al.'s eq. 8, the paper's default);
    ``midpoint``: alpha_k = (k - 0.5)/m; ``gauss``: Gauss-Legendre nodes mapped to [0, 1]."""
    if steps < 1:
        raise ConfigError.invalid("steps", steps, "must be at least 1")
    if rule == "right":
        alphas = np.arange(1, steps + 1) / steps
        weights = np.full(steps, 1 / steps)
    elif rule == "midpoint":
        alphas = (np.arange(1, steps + 1) - 0.5) / steps
        weights = np.full(steps, 1 / steps)
    elif rule == "gauss":
        nodes, gl_weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1) / 2, gl_weights / 2
    else:
        raise ConfigError.invalid("rule", rule, f"choose {', '.join(RULES)}")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


@contextlib.contextmanager
def frozen_parameters(lm: LoadedModel) -> Iterator[None]:
    """Gradients only with respect to activations: weight gradients would double the backward."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class AnswerProbability(torch.autograd.Function):
    """F = softmax(logits)[:, token] in fp32, with the analytic backward dF/dz = F (e_token - p).

    Autograd's generic softmax or logsumexp backward makes several passes over the
    [rows, vocabulary] tensors, which cost more than the output head's matmul on the CPU;
    this one reuses the saved probabilities in place. ``token`` is one token for every row, or a
    [rows] tensor of each row's own."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, token: int | torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), -1)
        index = torch.as_tensor(token, device=probs.device).expand(len(probs))[:, None]
        ctx.save_for_backward(probs, index)
        ctx.logits_dtype = logits.dtype
        return probs.gather(1, index)[:, 0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, index = ctx.saved_tensors
        coefficient = (grad * probs.gather(1, index)[:, 0])[:, None]
        grad_logits = probs.mul_(-coefficient)  # the graph is not kept: probs is free to reuse
        grad_logits.scatter_add_(1, index, coefficient)
        return grad_logits.to(ctx.logits_dtype), None


@dataclass
class LayerCall:
    """How the stock forward called one decoder layer, for a batch of one row per query."""

    hidden: torch.Tensor  # the layer's input hidden state [queries, positions, d_model]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@contextlib.contextmanager
def capture_layer_calls(lm: LoadedModel) -> Iterator[list[LayerCall]]:
    """Record how the stock forward calls each decoder layer (input hidden state, mask, position
    embeddings, cache); the yielded list is filled once the model has run (the last call wins)."""
    calls: dict[int, LayerCall] = {}

    def capture(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[layer] = LayerCall(hidden.detach(), args[1:] if args else (), rest)

        return hook

    ordered: list[LayerCall] = []
    handles = [
        layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(lm.layers)
    ]
    try:
        yield ordered
    finally:
        for handle in handles:
            handle.remove()
    ordered.extend(calls[layer] for layer in range(lm.num_layers))


def replay_layers(
    lm: LoadedModel,
    layer_calls: Sequence[LayerCall],
    row_layers: torch.Tensor,
    intervene: Callable[[int, slice], contextlib.AbstractContextManager[None]],
    cache: Any = None,
    row_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Push rows through the stock decoder layers as recorded in ``layer_calls``, each row joining
    at its own intervention layer (``row_layers``, sorted) from the clean input of that layer for
    its query (``row_queries``, the recorded batch row; default all 0); ``intervene(layer, rows)``
    is entered around the layer where the batch rows ``rows`` join. ``cache`` must already hold
    each running row's prefix. Returns the last layer's output hidden states [rows, positions,
    d_model]."""
    joining = torch.bincount(row_layers, minlength=lm.num_layers).tolist()
    active = list(itertools.accumulate(joining))  # rows running at each layer
    if row_queries is None:
        row_queries = torch.zeros_like(row_layers)
    hidden = None
    for layer in range(int(row_layers[0]), lm.num_layers):
        call = layer_calls[layer]
        rows = slice(active[layer] - joining[layer], active[layer])
        if joining[layer]:
            new_rows = call.hidden[row_queries[rows].to(call.hidden.device)]
            hidden = new_rows if hidden is None else torch.cat([hidden, new_rows])
        running = row_queries[: active[layer]]
        args = tuple(_for_rows(a, running, cache, len(call.hidden)) for a in call.args)
        kwargs = {k: _for_rows(v, running, cache, len(call.hidden)) for k, v in call.kwargs.items()}
        with intervene(layer, rows) if joining[layer] else contextlib.nullcontext():
            hidden = lm.layers[layer](hidden, *args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    assert hidden is not None
    return hidden


def _for_rows(value: Any, row_queries: torch.Tensor, cache: Any, queries: int) -> Any:
    """A recorded layer argument for the running rows: the cache becomes theirs, and a tensor with
    one entry per query (the attention mask; position embeddings of prompts that differ) becomes
    one per row. Tensors shared by the whole recorded batch (leading size 1) broadcast as they are.
    A batch-leading tensor is told by its leading size, as every decoder layer lays them out."""
    if isinstance(value, Cache):
        return cache
    if isinstance(value, tuple):
        return tuple(_for_rows(v, row_queries, cache, queries) for v in value)
    if queries > 1 and isinstance(value, torch.Tensor) and value.dim() >= 2 and len(value) == queries:
        return value[row_queries.to(value.device)]
    return value


def default_batch_rows(lm: LoadedModel, row_tokens: int = 1, free_bytes: int | None = None) -> int:
    """Rows per chunk for rows of ``row_tokens`` positions. On the CPU, CPU_ROW_TOKENS positions.
    On a GPU, what fits in half of ``free_bytes`` (default: what :func:`free_gpu_bytes` measures on
    the model's device now) by :func:`gpu_batch_rows`' per-row estimate."""
    if lm.device.type != "cuda":
        return max(1, CPU_ROW_TOKENS // row_tokens)
    free = free_gpu_bytes(lm.device) if free_bytes is None else free_bytes
    return gpu_batch_rows(lm.config, lm.dtype, lm.num_layers, lm.d_ff, free, row_tokens)


def gpu_batch_rows(
    config: Any, dtype: torch.dtype, num_layers: int, d_ff: int, free_bytes: int, row_tokens: int = 1
) -> int:
    """Rows of ``row_tokens`` positions that fit in half of ``free_bytes`` of GPU memory, for a model
    of ``config`` (a transformers configuration) with ``num_layers`` layers of ``d_ff`` neurons in
    ``dtype``. Per row: the activations every layer saves for the backward, keys and values of
    ESTIMATED_PROMPT_TOKENS positions (a row's copy of the prefix cache, or its own), and the fp32
    output distribution three times over. Needs no model, so a card not at hand can be sized."""
    d_model = config.hidden_size
    # Keys and values are those of the key-value heads only: a quarter of d_model wide under
    # Llama-3-8B's grouped-query attention (8 of 32 heads).
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d_model // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    element = torch.finfo(dtype).bits // 8
    kv_tokens = max(ESTIMATED_PROMPT_TOKENS, row_tokens)
    per_layer = (row_tokens * (8 * d_model + 4 * d_ff) + 2 * kv_tokens * kv_width) * element
    per_row = num_layers * per_layer + 3 * config.vocab_size * 4
    return max(1 if row_tokens > 1 else 8, int(0.5 * free_bytes / per_row))


def free_gpu_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on ``device``: what the driver reports free, plus the
    blocks torch's caching allocator holds from earlier work but no tensor uses (the driver counts
    them as taken, so without them every query would see less free memory than the one before)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class CleanRun:
    """The unintervened run of one or more queries, each an answer token predicted after a prompt
    of the same length (one batch row each): the decoder-layer calls to replay above each row's
    layer, the site tensors the paths end at, and (where rows share it) the prefix cache."""

    layer_calls: list[LayerCall]
    answer_tokens: torch.Tensor
    """[queries] each query's answer token."""
    values: torch.Tensor
    """The site's clean tensor per query and layer, fp32: [queries, L, d_ff] at the target
    (neurons), [queries, L, heads, T, T] (attention)."""
    f_input: torch.Tensor
    """[queries] F at the clean input."""
    row_positions: int
    """Positions a replayed row carries: 1 over a shared prefix cache, else the whole prompt."""
    prefix_cache: Any = None
    """A transformers Cache of the positions before the target, one batch row per query, shared by
    every replayed row of that query; None where rows carry the whole prompt, or the target is
    position 0."""
    input_gradients: torch.Tensor | None = None
    """dF/dv_l at the clean input, fp32, shaped as ``values``; only where asked for."""


@dataclass
class PathIntegrals:
    """What the integrator returns for one answer token: per start point b and layer l, the
    weighted sum of gradients along the path, and F at the path's start."""

    values: torch.Tensor  # [L, *site] v_l
    grad_sums: torch.Tensor  # [B, L, *site] sum_k w_k dF/dv at s + alpha_k (v - s)
    f_input: float
    f_start: torch.Tensor  # [B, L]


def _replace_rows(rows: slice, points: torch.Tensor) -> SiteFn:
    """A site function for one layer: batch rows ``rows`` take their path points."""

    def fn(tensor: torch.Tensor) -> torch.Tensor:
        replaced = tensor.clone()
        # Layers may sit on several devices; a neuron row's tensor is its one target position.
        replaced[rows] = points[rows].to(tensor.device, tensor.dtype).reshape(replaced[rows].shape)
        return replaced

    return fn


class _CleanObserver:
    """The site functions of a clean run: each records its layer's clean site tensor and, where
    input gradients are asked for, adds a zero fp32 offset to it, a leaf that keeps the layer's
    tensor on the graph so that one backward gives dF/dv_l for every layer."""

    def __init__(self, gradients: bool) -> None:
        self.gradients = gradients
        self.recorded: dict[int, torch.Tensor] = {}
        self.offsets: dict[int, torch.Tensor] = {}

    def site_fn(self, layer: int) -> SiteFn:
        def fn(tensor: torch.Tensor) -> torch.Tensor:
            self.recorded[layer] = tensor.detach().clone()
            if not self.gradients:
                return tensor
            self.offsets[layer] = torch.zeros_like(tensor, dtype=torch.float32, requires_grad=True)
            return tensor + self.offsets[layer].to(tensor.dtype)

        return fn


class PathIntegrator:
    """Batched path integration at one site of one model (see the module docstring). For a site
    that needs a context (attention: the probe), both steps run inside ``site.active(lm)``."""

    def __init__(self, lm: LoadedModel, site: Site, max_batch_rows: int | None = None) -> None:
        self.lm, self.site, self.max_batch_rows = lm, site, max_batch_rows

    def clean_run(self, ids: Sequence[int], answer_token: int, gradients: bool = False) -> CleanRun:
        """The clean run of one query: ``answer_token`` predicted after ``ids``."""
        return self.clean_batch([ids], [answer_token], gradients)

    def clean_batch(
        self, ids: Sequence[Sequence[int]], answer_tokens: Sequence[int], gradients: bool = False
    ) -> CleanRun:
        """The decoder-layer calls, the site tensors and F(input) for each query q, ``answer_tokens[q]``
        predicted after ``ids[q]`` (at their last position; every ``ids[q]`` of one length, so that
        the batch holds no padding). With ``gradients``, also dF/dv_l at the clean input for every
        query and layer, from the same forward and one backward: a zero offset added to every
        layer's site tensor keeps each on the graph, and the gradient with respect to layer l's
        offset is the total derivative through every layer above it, as a path row of layer l
        alone computes it at alpha = 1."""
        lm, shared_prefix = self.lm, self.site.one_position
        if len({len(row) for row in ids}) != 1:
            raise ValueError("a clean batch needs prompts of one length")
        ids_t = torch.tensor([list(row) for row in ids], device=lm.device)
        target = ids_t.shape[1] - 1
        observer = _CleanObserver(gradients)
        with capture_layer_calls(lm) as calls:
            prefix_cache = None
            if shared_prefix and target > 0:
                with torch.no_grad():
                    prefix = lm.model(input_ids=ids_t[:, :target], use_cache=True, logits_to_keep=1)
                prefix_cache = prefix.cache
            run_ids = ids_t[:, target:] if shared_prefix else ids_t
            positions = torch.tensor([0]) if shared_prefix else None
            observers = {layer: observer.site_fn(layer) for layer in range(lm.num_layers)}
            with self.site.replace(lm, observers, positions), torch.set_grad_enabled(gradients):
                out = lm.model(
                    input_ids=run_ids,
                    cache=copy.deepcopy(prefix_cache),
                    use_cache=shared_prefix,
                    logits_to_keep=1,
                )
                f = AnswerProbability.apply(out.logits[:, -1], torch.tensor(list(answer_tokens)))
        input_gradients = None
        if gradients:
            # Batch rows do not interact (no padding, and every layer acts on each row alone), so
            # F_q depends on query q's offsets only, and the gradient of sum_q F_q with respect to
            # row q of an offset is dF_q/dv_q: one backward gives every query its own gradients.
            grads = torch.autograd.grad(f.sum(), [observer.offsets[layer] for layer in range(lm.num_layers)])
            input_gradients = torch.stack([grad.to(lm.device) for grad in grads], dim=1)
        values = torch.stack(
            [observer.recorded[layer].to(lm.device) for layer in range(lm.num_layers)], dim=1
        ).float()
        return CleanRun(
            calls,
            torch.tensor(list(answer_tokens)),
            values,
            f.detach().cpu(),
            run_ids.shape[1],
            prefix_cache,
            input_gradients,
        )

    def replay(
        self,
        clean: CleanRun,
        row_layers: torch.Tensor,
        points: torch.Tensor,
        row_queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits at the last position [rows, vocab] for rows sorted by layer (``row_layers``),
        row r a row of query ``row_queries[r]`` (default all 0) with its site tensor at its layer
        replaced by ``points[r]``."""
        num_layers = self.lm.num_layers
        if row_queries is None:
            row_queries = torch.zeros_like(row_layers)
        active = list(itertools.accumulate(torch.bincount(row_layers, minlength=num_layers).tolist()))
        cache = copy.deepcopy(clean.prefix_cache)
        if cache is not None:
            for layer in range(num_layers):
                if active[layer]:
                    cache.layers[layer].batch_select_indices(row_queries[: active[layer]].to(self.lm.device))

        def intervene(layer: int, rows: slice) -> contextlib.AbstractContextManager[None]:
            return self.site.replace(self.lm, {layer: _replace_rows(rows, points)})

        hidden = replay_layers(self.lm, clean.layer_calls, row_layers, intervene, cache, row_queries)
        return self.lm.logits_from_final_hidden(hidden[:, -1])

    def integrate(
        self, clean: CleanRun, starts: torch.Tensor | None, alphas: torch.Tensor, weights: torch.Tensor
    ) -> PathIntegrals:
        """Integrate from each start point ([B, L, *site] fp32, or None for zeros) to the clean site
        tensors, every layer on its own; for a clean run of one query (its rows fill the batch)."""
        if len(clean.values) != 1:
            raise ValueError("path integration takes the clean run of one query")
        num_layers, device = self.lm.num_layers, self.lm.device
        values = clean.values[0].to(device)
        starts = (torch.zeros((1, *values.shape)) if starts is None else starts).to(device)
        num_starts = starts.shape[0]
        # Row = (layer l, start b, step k), ordered by layer so that a chunk holds nearby layers;
        # step 0 is alpha = 0, the path's start, kept for F(start) and left out of the gradient sum.
        path_alphas = torch.cat([torch.zeros(1), alphas]).to(device)
        path_weights = torch.cat([torch.zeros(1), weights]).to(device)
        per_row = (-1,) + (1,) * (values.dim() - 1)  # broadcasts a row's scalar over its site tensor
        steps = len(path_alphas)
        rows_per_layer = num_starts * steps
        grad_sums = torch.zeros((num_starts, *values.shape), device=device)
        f_start = torch.zeros((num_starts, num_layers), device=device)
        total = num_layers * rows_per_layer
        chunk = self.max_batch_rows or default_batch_rows(self.lm, clean.row_positions)
        for first in range(0, total, chunk):
            rows = torch.arange(first, min(first + chunk, total), device=device)
            row_l, row_b, row_k = rows // rows_per_layer, (rows // steps) % num_starts, rows % steps
            start_points = starts[row_b, row_l]
            alpha = path_alphas[row_k].view(per_row)
            points = (start_points + alpha * (values[row_l] - start_points)).requires_grad_(True)
            f = AnswerProbability.apply(self.replay(clean, row_l, points), int(clean.answer_tokens[0]))
            (grad,) = torch.autograd.grad(f[row_k > 0].sum(), points)
            weighted = grad.float() * path_weights[row_k].view(per_row)
            grad_sums.index_put_((row_b, row_l), weighted, accumulate=True)
            at_start = row_k == 0
            f_start[row_b[at_start], row_l[at_start]] = f[at_start].detach()
        return PathIntegrals(values.cpu(), grad_sums.cpu(), float(clean.f_input[0]), f_start.cpu())

    def input_gradients(self, clean: CleanRun, starts: torch.Tensor | None) -> list[PathIntegrals]:
        """What :meth:`integrate` gives for the one-step right rule (alpha = 1, weight 1), per query
        of a clean run made with ``gradients``: its input gradients for every start point, and F at
        each start point for the completeness check (one replayed row per query, start and layer,
        all queries in one batch, no backward). ``starts``: [queries, B, L, *site] fp32, or None for
        zeros."""
        if clean.input_gradients is None:
            raise ValueError("the clean run was made without gradients")
        values, grads = clean.values, clean.input_gradients
        if starts is None:
            starts = torch.zeros((len(values), 1, *values.shape[1:]))
        f_start = self.f_at(clean, starts.to(self.lm.device)).cpu()
        return [
            PathIntegrals(
                values[q].cpu(),
                grads[q].expand(starts.shape[1], *grads.shape[1:]).cpu(),
                float(f),
                f_start[q],
            )
            for q, f in enumerate(clean.f_input)
        ]

    @torch.no_grad()
    def f_at(self, clean: CleanRun, starts: torch.Tensor) -> torch.Tensor:
        """[queries, B, L]: F with query q's layer l site tensor set to its start point b
        ([queries, B, L, *site]), every layer on its own, in row chunks as :meth:`integrate` cuts
        them."""
        num_queries, num_starts, num_layers = starts.shape[:3]
        f_start = torch.zeros((num_queries, num_starts, num_layers), device=starts.device)
        per_layer = num_queries * num_starts
        total = per_layer * num_layers
        chunk = self.max_batch_rows or default_batch_rows(self.lm, clean.row_positions)
        tokens = clean.answer_tokens.to(starts.device)
        for first in range(0, total, chunk):
            rows = torch.arange(first, min(first + chunk, total), device=starts.device)
            # Ordered by layer, as replay needs; within a layer by query, then start point.
            row_l, row_q, row_b = rows // per_layer, (rows // num_starts) % num_queries, rows % num_starts
            logits = self.replay(clean, row_l, starts[row_q, row_b, row_l], row_q)
            probs = torch.softmax(logits.float(), -1)
            f_start[row_q, row_b, row_l] = probs.gather(1, tokens[row_q][:, None])[:, 0]
        return f_start
