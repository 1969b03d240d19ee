"""Knowledge-neuron attribution: IG, AMIG and SIG scores for every neuron of every layer.

The definitions are METHODS.md section 3: for each layer l on its own, the activation vector at
the target position is moved along a straight path from a baseline b_l to its value a_l, and
score_l = (a_l - b_l) * sum_k w_k dF(b_l + alpha_k (a_l - b_l)) / d a_l.

How it is computed fast. The intervention touches one position, the target position p, so
everything before p, and everything below the intervened layer at p, is the same for every
(layer, step) row. The engine runs the prompt prefix once with a KV cache and records how the
stock forward calls each decoder layer at the target position (hidden state in, mask, position
embeddings). It then pushes the (layer, baseline, step) rows as one batch through the stock
decoder-layer modules, each row joining at its intervention layer and replacing the activation
there, over the shared prefix cache, and gets every gradient from one backward. Only the output head (final norm, unembedding, soft-capping) is applied by qloc, from
the architecture table.

One class per method (captum style), sharing the engine: a method says which baselines it
integrates from and how it combines the per-baseline scores.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..errors import DataError, QlocError
from .architectures import ArchitectureSpec
from .interventions import activation_hooks, record_activations
from .models import LoadedModel
from .tokens import EncodedQuery, encode_query

Rule = Literal["right", "midpoint", "gauss"]
AnswerTokens = Literal["all", "first"]
RESIDUAL_WARNING = 0.05
"""Warn when a layer's completeness residual exceeds this fraction of F(input)."""


def integration_points(steps: int, rule: Rule = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha_k in (0, 1] and weights w_k with sum_k w_k g(alpha_k) ~ integral_0^1 g.

    ``right``: alpha_k = k/m, w_k = 1/m (Dai et al.'s eq. 8, the paper's default);
    ``midpoint``: alpha_k = (k - 0.5)/m; ``gauss``: Gauss-Legendre nodes mapped to [0, 1]."""
    if steps < 1:
        raise QlocError(f"--steps must be at least 1, got {steps}")
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
        raise QlocError(f"--rule {rule!r}: choose right, midpoint or gauss")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


@dataclass
class Attribution:
    """Scores of one (prompt, answer) query; ``scores`` is float32 [num_layers, d_ff] on the CPU."""

    method: str
    prompt: str
    answer: str
    answer_tokens: list[int]
    scores: torch.Tensor
    f_input: torch.Tensor
    """F at the input, per answer token used: [tokens]."""
    f_baseline: torch.Tensor
    """F with only layer l's activation set to its baseline, per token and layer: [tokens, L]
    (SIG: averaged over its per-word baselines)."""
    completeness_residual: torch.Tensor
    """|sum of layer l's scores - (F(input) - F(baseline))| per token and layer: [tokens, L]. SIG's
    is that of its un-normalised per-word integrals summed over words."""
    steps: int
    rule: str
    params: dict = field(default_factory=dict)

    def kn_set(self, threshold: float = 0.2, top_k: int | None = None) -> list[tuple[int, int]]:
        return kn_set(self.scores, threshold, top_k)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        return [(l, i, float(self.scores[l, i])) for l, i in top_k(self.scores, k)]


def kn_set(
    scores: torch.Tensor, threshold: float = 0.2, top_k_neurons: int | None = None
) -> list[tuple[int, int]]:
    """K_q = {(l, i) : score >= t * max score} (Dai et al., t = 0.2); with ``top_k_neurons``, the
    k highest-scoring neurons instead. Empty where no score is positive (nothing to localize)."""
    if top_k_neurons is not None:
        return top_k(scores, top_k_neurons)
    peak = float(scores.max())
    if peak <= 0:
        return []
    layers, neurons = torch.nonzero(scores >= threshold * peak, as_tuple=True)
    return sorted(zip(layers.tolist(), neurons.tolist()))


def top_k(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k highest-scoring neurons, best first."""
    flat = scores.flatten().topk(min(k, scores.numel())).indices
    d_ff = scores.shape[1]
    return [(int(i) // d_ff, int(i) % d_ff) for i in flat]


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


@dataclass
class LayerCall:
    """How the stock forward called one decoder layer at the target position (batch 1)."""

    hidden: torch.Tensor  # the layer's input hidden state [1, 1, d_model]
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture_layer_calls(lm: LoadedModel) -> Iterator[list[LayerCall]]:
    """Record how the stock forward calls each decoder layer (input hidden state, mask, position
    embeddings, cache); the yielded list is filled once the model has run (the last call wins)."""
    calls: dict[int, LayerCall] = {}

    def capture(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[layer] = LayerCall(
                hidden.detach(),
                args[1:] if args else (),
                {k: v for k, v in kwargs.items() if k != "hidden_states"},
            )

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
    intervene: Callable[[int, slice], contextlib.AbstractContextManager],
    cache: Any = None,
) -> torch.Tensor:
    """Push rows through the stock decoder layers as recorded in ``layer_calls``, each row joining
    at its own intervention layer (``row_layers``, sorted) from the clean input of that layer;
    ``intervene(layer, rows)`` is entered around the layer where the batch rows ``rows`` join.
    Returns the last layer's output hidden states [rows, seq, d_model]."""
    joining = torch.bincount(row_layers, minlength=lm.num_layers).tolist()
    active = list(itertools.accumulate(joining))  # rows running at each layer
    hidden = None
    for layer in range(int(row_layers[0]), lm.num_layers):
        call = layer_calls[layer]
        if joining[layer]:
            new_rows = call.hidden.expand(joining[layer], *call.hidden.shape[1:])
            hidden = new_rows if hidden is None else torch.cat([hidden, new_rows])
        args = tuple(cache if isinstance(a, Cache) else a for a in call.args)
        kwargs = {k: cache if isinstance(v, Cache) else v for k, v in call.kwargs.items()}
        rows = slice(active[layer] - joining[layer], active[layer])
        with intervene(layer, rows) if joining[layer] else contextlib.nullcontext():
            hidden = lm.layers[layer](hidden, *args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


@dataclass
class CleanPass:
    """The unintervened run of one answer token: the prefix cache shared by every row, the
    decoder-layer calls to replay above each row's intervention, and the values the paths end at."""

    prefix_cache: Any  # a transformers Cache for positions < target, or None at position 0
    layer_calls: list[LayerCall]
    answer_token: int
    activations: torch.Tensor  # [L, d_ff] fp32
    f_input: float


@dataclass
class PathIntegrals:
    """What the engine returns for one answer token: per baseline b and layer l, the weighted sum
    of gradients along the path, and F at the path's start."""

    activations: torch.Tensor  # [L, d_ff] a_l at the target position
    grad_sums: torch.Tensor  # [B, L, d_ff] sum_k w_k dF/da at b + alpha_k (a - b)
    f_input: float
    f_baseline: torch.Tensor  # [B, L]


class PathEngine:
    """Batched path integration for one model (see the module docstring).

    Rows are ordered by their intervention layer and cut into passes of at most
    ``max_batch_rows``. Within a pass the batch grows as it climbs: at layer j the rows whose
    intervention layer is j join, starting from the clean input of layer j, so every row runs only
    the layers from its own intervention up."""

    def __init__(self, lm: LoadedModel, max_batch_rows: int | None = None) -> None:
        self.lm = lm
        self.max_batch_rows = max_batch_rows or default_batch_rows(lm)

    def clean_pass(self, ids: Sequence[int], target: int, answer_token: int) -> CleanPass:
        """Prefix KV cache (positions < target), the decoder-layer calls at ``target``, its
        activations and F(input)."""
        lm, device = self.lm, self.lm.device
        ids_t = torch.tensor([list(ids[: target + 1])], device=device)
        with capture_layer_calls(lm) as calls, torch.no_grad():
            prefix_cache = (
                lm.model(input_ids=ids_t[:, :target], use_cache=True, logits_to_keep=1).cache
                if target > 0
                else None
            )
            with record_activations(lm, positions=torch.tensor([0])) as acts:
                out = lm.model(input_ids=ids_t[:, target:], cache=copy.deepcopy(prefix_cache), use_cache=True)
        f_input = float(torch.softmax(out.logits[0, -1].float(), -1)[answer_token])
        activations = torch.stack([acts[l][0].to(device) for l in range(lm.num_layers)]).float()
        return CleanPass(prefix_cache, calls, answer_token, activations, f_input)

    def replay(self, clean: CleanPass, row_layers: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Logits at the target position [rows, vocab] for rows sorted by intervention layer
        (``row_layers``), row r's activation at its layer replaced by ``points[r]``."""
        num_layers = self.lm.num_layers
        active = list(itertools.accumulate(torch.bincount(row_layers, minlength=num_layers).tolist()))
        cache = copy.deepcopy(clean.prefix_cache)
        if cache is not None:
            for layer in range(num_layers):
                if active[layer]:
                    cache.layers[layer].batch_repeat_interleave(active[layer])

        def intervene(layer: int, rows: slice):
            return activation_hooks(self.lm, {layer: _replace_rows(rows, points)})

        hidden = replay_layers(self.lm, clean.layer_calls, row_layers, intervene, cache)
        return self.lm.logits_from_final_hidden(hidden[:, -1])

    def integrate(
        self, clean: CleanPass, baselines: torch.Tensor | None, alphas: torch.Tensor, weights: torch.Tensor
    ) -> PathIntegrals:
        """Integrate from each baseline ([B, L, d_ff] fp32, or None for the zero baseline of IG)
        to the clean activations, every layer on its own."""
        lm = self.lm
        num_layers, device = lm.num_layers, lm.device
        activations = clean.activations.to(device)
        if baselines is None:
            baselines = torch.zeros((1,) + activations.shape)
        baselines = baselines.to(device)
        num_baselines = baselines.shape[0]
        # Row = (layer l, baseline b, step k), ordered by layer so that a pass holds nearby
        # layers; step 0 is alpha = 0, the path's start, kept for F(baseline) and left out of
        # the gradient sum.
        path_alphas = torch.cat([torch.zeros(1), alphas]).to(device)
        path_weights = torch.cat([torch.zeros(1), weights]).to(device)
        steps = len(path_alphas)
        rows_per_layer = num_baselines * steps
        grad_sums = torch.zeros((num_baselines, num_layers, activations.shape[1]), device=device)
        f_baseline = torch.zeros((num_baselines, num_layers), device=device)
        total = num_layers * rows_per_layer
        for start in range(0, total, self.max_batch_rows):
            rows = torch.arange(start, min(start + self.max_batch_rows, total), device=device)
            row_l, row_b, row_k = rows // rows_per_layer, (rows // steps) % num_baselines, rows % steps
            start_points = baselines[row_b, row_l]
            points = (
                start_points + path_alphas[row_k, None] * (activations[row_l] - start_points)
            ).requires_grad_(True)
            logits = self.replay(clean, row_l, points)
            f = AnswerProbability.apply(logits, clean.answer_token)
            (grad,) = torch.autograd.grad(f[row_k > 0].sum(), points)
            grad_sums.index_put_((row_b, row_l), grad * path_weights[row_k, None], accumulate=True)
            start_rows = row_k == 0
            f_baseline[row_b[start_rows], row_l[start_rows]] = f[start_rows].detach()
        return PathIntegrals(activations.cpu(), grad_sums.cpu(), clean.f_input, f_baseline.cpu())


class AnswerProbability(torch.autograd.Function):
    """F = softmax(logits)[:, token] in fp32, with the analytic backward dF/dz = F (e_token - p).

    Autograd's generic softmax or logsumexp backward makes several passes over the
    [rows, vocabulary] tensors, which cost more than the output head's matmul on the CPU;
    this one reuses the saved probabilities in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token: int) -> torch.Tensor:
        probs = torch.softmax(logits.float(), -1)
        ctx.save_for_backward(probs)
        ctx.token, ctx.logits_dtype = token, logits.dtype
        return probs[:, token].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        coefficient = grad * probs[:, ctx.token]
        grad_logits = probs.mul_(-coefficient[:, None])  # the graph is not kept: probs is free to reuse
        grad_logits[:, ctx.token] += coefficient
        return grad_logits.to(ctx.logits_dtype), None


def _replace_rows(rows: slice, points: torch.Tensor):
    """Activation function for one layer: batch rows ``rows`` take their path points."""

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        replaced = hidden.clone()
        replaced[rows, -1] = points[rows].to(hidden.device, hidden.dtype)  # layers may sit on several devices
        return replaced

    return fn


def default_batch_rows(lm: LoadedModel) -> int:
    """Rows per chunk: fixed on the CPU; on a GPU, what fits in half of the free memory by a
    per-row estimate (saved activations for the backward through every layer, the fp32 output
    distribution, and the row's copy of the prefix cache for a 64-token prompt)."""
    if lm.device.type != "cuda":
        return 1024
    config = lm.config
    d_model = config.hidden_size
    # The cache holds keys and values of the key-value heads only: a quarter of d_model wide under
    # Llama-3-8B's grouped-query attention (8 of 32 heads).
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d_model // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    element = torch.finfo(lm.dtype).bits // 8
    per_layer = (8 * d_model + 4 * lm.d_ff) * element + 2 * 64 * kv_width * element
    per_row = lm.num_layers * per_layer + 3 * config.vocab_size * 4
    return max(8, int(0.5 * free_gpu_bytes(lm.device) / per_row))


def free_gpu_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on ``device``: what the driver reports free, plus the
    blocks torch's caching allocator holds from earlier work but no tensor uses (the driver counts
    them as taken, so without them every query would see less free memory than the one before)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class NeuronAttributionMethod:
    """Base of IG, AMIG and SIG: which baselines to integrate from and how to combine them."""

    name = ""
    zero_baseline = False
    """Integrates from all-zero activations. Where the MLP output is normalised before the residual
    add (Gemma 2/3), F is flat along that path and the scores are degenerate (they sum to ~0)."""

    @classmethod
    def degenerate_on(cls, arch: ArchitectureSpec) -> bool:
        return cls.zero_baseline and arch.mlp_output_normalized

    def baselines(self, lm: LoadedModel, query: EncodedQuery, target_index: int) -> torch.Tensor | None:
        """[B, L, d_ff] fp32 baseline activations at the target position, or None for zeros."""
        raise NotImplementedError

    def combine(self, per_baseline: torch.Tensor) -> torch.Tensor:
        """[B, L, d_ff] per-baseline integrated gradients -> [L, d_ff] scores."""
        return per_baseline[0]


class IntegratedGradients(NeuronAttributionMethod):
    """IG (Dai et al. 2022): zero baseline."""

    name = "ig"
    zero_baseline = True

    def baselines(self, lm, query, target_index):
        return None


class AMIG(NeuronAttributionMethod):
    """Architecture-adapted multilingual IG (Chen et al. 2024a): baseline = mean over prompt words
    j of the activations with word j replaced by EOS."""

    name = "amig"

    def baselines(self, lm, query, target_index):
        eos = lm.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"AMIG needs an EOS token; {lm.name!r}'s tokenizer has none")
        return word_baselines(lm, query, target_index, eos).mean(0, keepdim=True)


class SIG(NeuronAttributionMethod):
    """Sequential IG (Enguehard 2023) on neurons: one path per prompt word j from the activations
    with word j replaced by the mask (or pad, or EOS) token; each word's attribution is L2
    normalised, and the sum is scaled by the mean per-word norm (see :meth:`combine`)."""

    name = "sig"

    def baselines(self, lm, query, target_index):
        tok = lm.tokenizer
        replacement = next(
            (t for t in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None), None
        )
        if replacement is None:
            raise DataError(f"SIG needs a mask, pad or EOS token; {lm.name!r}'s tokenizer has none")
        return word_baselines(lm, query, target_index, replacement)

    def combine(self, per_baseline):
        """sum_j IG_j / ||IG_j||, times the mean ||IG_j||: every word weighs the same, and the scores
        keep the raw attributions' units. The factor is positive, so no neuron changes sign. (The
        BERT-era rescale to sum_j sum(IG_j) / sum(normalised) flips every score where those two
        totals differ in sign, and the KN set becomes the most negative neurons.)"""
        norms = per_baseline.flatten(1).norm(dim=1)
        words = norms > 0  # a word whose replacement changes nothing carries no direction
        if not bool(words.any()):
            return torch.zeros_like(per_baseline[0])
        normalised = (per_baseline[words] / norms[words, None, None]).sum(0)
        return normalised * norms[words].mean()


METHODS: dict[str, type[NeuronAttributionMethod]] = {m.name: m for m in (IntegratedGradients, AMIG, SIG)}


@torch.no_grad()
def word_baselines(lm: LoadedModel, query: EncodedQuery, target_index: int, replacement: int) -> torch.Tensor:
    """[positions, L, d_ff]: activations at the target position when prompt token j is replaced
    by ``replacement``, one row per j. Choice: j runs over the prompt's own tokens, not the ones
    the tokenizer adds (BOS): METHODS.md's "each prompt position" is read as each position of the
    query text, since replacing BOS by EOS takes the model off its training distribution."""
    words = [j for j, special in enumerate(query.prompt_special) if not special]
    target = query.target_positions[target_index]
    ids = torch.tensor(query.input_ids[: target + 1], device=lm.device).repeat(len(words), 1)
    ids[torch.arange(len(words)), torch.tensor(words)] = replacement
    rows = torch.arange(len(words))
    with record_activations(lm, positions=torch.full_like(rows, target)) as acts:
        lm.model(input_ids=ids, logits_to_keep=1)  # only the activations are needed
    return torch.stack([acts[l].cpu() for l in range(lm.num_layers)], dim=1).float()


def attribute(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    method: str = "ig",
    steps: int = 20,
    rule: Rule = "right",
    answer_tokens: AnswerTokens = "first",
    max_batch_rows: int | None = None,
) -> Attribution:
    """Attribution scores of every neuron for ``answer`` after ``prompt`` (METHODS.md section 3).

    F is the probability of the answer's first token (a causal LM's probability of the answer
    being started); ``answer_tokens="all"`` teacher-forces a multi-token answer and averages the
    per-token scores."""
    if method not in METHODS:
        raise QlocError(f"unknown attribution method {method!r}: choose {', '.join(METHODS)}")
    if answer_tokens not in ("all", "first"):
        raise QlocError(f"answer_tokens={answer_tokens!r}: choose all or first")
    if METHODS[method].degenerate_on(lm.arch):
        warnings.warn(
            f"{lm.name!r} ({lm.arch.family}) normalises the MLP output before the residual add, so F is flat "
            "in a uniform scaling of the activations and IG scores with a zero baseline sum to about 0. "
            "AMIG and SIG (non-zero baselines) remain meaningful on this model.",
            stacklevel=2,
        )
    query = encode_query(lm, prompt, answer)
    alphas, weights = integration_points(steps, rule)
    engine = PathEngine(lm, max_batch_rows)
    algorithm = METHODS[method]()
    token_indices = range(1 if answer_tokens == "first" else len(query.answer_ids))
    scores, f_inputs, f_baselines, residuals = [], [], [], []
    with frozen_parameters(lm):
        for t in token_indices:
            target, answer_token = query.target_positions[t], query.answer_ids[t]
            clean = engine.clean_pass(query.input_ids, target, answer_token)
            baselines = algorithm.baselines(lm, query, t)
            paths = engine.integrate(clean, baselines, alphas, weights)
            start = torch.zeros_like(paths.activations)[None] if baselines is None else baselines
            per_baseline = (paths.activations[None] - start) * paths.grad_sums
            scores.append(algorithm.combine(per_baseline))
            f_inputs.append(paths.f_input)
            f_baselines.append(paths.f_baseline.mean(0))
            expected = (paths.f_input - paths.f_baseline).sum(0)
            residuals.append((per_baseline.sum(2).sum(0) - expected).abs())
    result = Attribution(
        method=method,
        prompt=prompt,
        answer=answer,
        answer_tokens=list(query.answer_ids[: len(token_indices)]),
        scores=torch.stack(scores).mean(0).float(),
        f_input=torch.tensor(f_inputs),
        f_baseline=torch.stack(f_baselines),
        completeness_residual=torch.stack(residuals),
        steps=steps,
        rule=rule,
        params={
            "method": method,
            "steps": steps,
            "rule": rule,
            "answer_tokens": answer_tokens,
            "baselines": len(per_baseline),
        },
    )
    _warn_if_incomplete(result)
    return result


def _warn_if_incomplete(result: Attribution) -> None:
    worst = result.completeness_residual.max(dim=0).values
    # SIG's residual sums one path per prompt token, so its tolerance does too.
    limit = RESIDUAL_WARNING * float(result.f_input.max()) * result.params["baselines"]
    if float(worst.max()) > limit and math.isfinite(limit):
        layer = int(worst.argmax())
        warnings.warn(
            f"{result.method} on {result.prompt!r} / {result.answer!r}: layer {layer}'s scores miss "
            f"F(input) - F(baseline) by {float(worst[layer]):.3g} (F(input) = {float(result.f_input.max()):.3g}); "
            f"the {result.steps}-step {result.rule} rule is too coarse here: raise --steps or use --rule midpoint/gauss",
            stacklevel=3,
        )


def attribute_many(
    lm: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    method: str = "ig",
    **kwargs,
) -> list[Attribution]:
    """:func:`attribute` for each (prompt, answer); each query's rows are one batched pass."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [attribute(lm, p, a, method, **kwargs) for p, a in zip(prompts, answers)]
