"""Attribution methods: IG, AMIG and SIG scores for every neuron, their first-order tier GxA (IG's
and AMIG's baselines), and IG scores for every attention probability, on the one path integrator
(:mod:`qloc.engine.paths`).

The definitions are METHODS.md sections 3 and 7: for each layer l on its own, the site tensor at
the target position (neurons) or of the whole prompt (attention probabilities) is moved along a
straight path from a baseline b_l to its value a_l, and score_l = (a_l - b_l) * sum_k w_k
dF(b_l + alpha_k (a_l - b_l)) / d a_l, with F the probability of the answer token.

One class per method (captum style) says which site it attributes, which baselines it integrates
from and how it combines the per-baseline scores; :class:`PathMethod` runs the answer tokens
through the integrator and computes the completeness residual, and warns where it is too large,
once for every method.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

import torch

from ..errors import ConfigError, DataError
from ..settings import setting
from .architectures import ArchitectureSpec
from .models import LoadedModel
from .paths import PathIntegrals, PathIntegrator, frozen_parameters, integration_points
from .sites import ATTENTION, NEURONS, Site, Synapse
from .tokens import EncodedQuery, encode_query

ANSWER_TOKENS = ("all", "first")
DEFAULT_STEPS = 20
"""Integration steps m of every path method (Dai et al.'s setting), wherever a caller gives none."""
DEFAULT_KN_THRESHOLD = 0.2
"""A query's KN set: the neurons scoring at least this share of its best score (METHODS.md section 3)."""
DEFAULT_SYNAPSE_THRESHOLD = 0.3
"""A query's knowledge synapses: the attention probabilities scoring at least this share of its best
score (METHODS.md section 7)."""
RESIDUAL_WARNING = 0.05
"""Warn when a layer's completeness residual exceeds this fraction of F(input)."""


def check_answer_tokens(answer_tokens: str) -> None:
    if answer_tokens not in ANSWER_TOKENS:
        raise ConfigError.invalid("answer_tokens", answer_tokens, "choose all or first")


@dataclass(frozen=True)
class PathSettings:
    """How a query's paths are integrated, whichever the method and the site: ``steps`` m of the
    quadrature ``rule``, with F the probability of the first answer token or the mean over all of
    them (METHODS.md section 3). Each has its one default here, and is checked here, once, when the
    settings are made (the first-order methods ignore ``steps`` and ``rule``)."""

    steps: int = setting(DEFAULT_STEPS)
    rule: str = setting("right")
    answer_tokens: str = setting("first")

    def __post_init__(self) -> None:
        """Reject bad settings before a run stores them as its parameters."""
        integration_points(self.steps, self.rule)
        check_answer_tokens(self.answer_tokens)

    def params(self) -> dict[str, Any]:
        """The settings by name, as a run stores them (flat, beside its other parameters)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """The settings a run stored among its parameters (``params``: a stage's, flat)."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


@dataclass(frozen=True)
class AttributionSettings(PathSettings):
    """What decides a query's neuron scores and its KN set, the method aside: the
    :class:`PathSettings` and the KN-set cut, ``threshold`` x the best score or the ``top_k`` best
    neurons. ``qloc localize`` stores them among its parameters, flat (``steps``, ``threshold``, ...,
    as before they were grouped)."""

    threshold: float = setting(DEFAULT_KN_THRESHOLD, "KN set: score >= threshold * max score.")
    top_k: int | None = setting(None, "KN set: the k best neurons instead of the threshold.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold <= 1:
            raise ConfigError.invalid("threshold", self.threshold, "must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError.invalid("top_k", self.top_k, "must be at least 1")

    def kn_set(self, result: Attribution) -> list[tuple[int, int]]:
        """``result``'s KN set under this cut."""
        return result.kn_set(self.threshold, self.top_k)


def path_settings(
    settings: PathSettings | None = None,
    steps: int | None = None,
    rule: str | None = None,
    answer_tokens: str | None = None,
) -> PathSettings:
    """``settings`` (default: the defaults) with each of ``steps``, ``rule`` and ``answer_tokens``
    that is given in its place: what :func:`attribute` and its siblings take as keyword arguments."""
    given = {"steps": steps, "rule": rule, "answer_tokens": answer_tokens}
    chosen: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    base = settings if settings is not None else PathSettings()
    return replace(base, **chosen) if chosen else base


@dataclass
class PathScores:
    """What a method computes for one query: scores averaged over the answer tokens used, and
    what their completeness is checked against."""

    scores: torch.Tensor
    f_input: torch.Tensor  # [tokens]
    f_start: torch.Tensor  # [tokens, L]: F with layer l at its baseline (mean over baselines)
    completeness_residual: torch.Tensor  # [tokens, L]
    answer_tokens: list[int]
    baselines: int

    def result_fields(self, prompt: str, answer: str, steps: int, rule: str) -> dict[str, Any]:
        """The fields every attribution result has, for this query."""
        return {
            "prompt": prompt,
            "answer": answer,
            "answer_tokens": self.answer_tokens,
            "scores": self.scores,
            "f_input": self.f_input,
            "completeness_residual": self.completeness_residual,
            "steps": steps,
            "rule": rule,
        }


class PathMethod:
    """Base of every attribution method: the site, where paths start, how per-start scores combine."""

    name: ClassVar[str]
    site: ClassVar[Site]
    fixed_rule: ClassVar[tuple[int, str] | None] = None
    """(steps, rule) of a method that has one integration rule, whatever is asked for."""

    def baselines(self, lm: LoadedModel, query: EncodedQuery, target_index: int) -> torch.Tensor | None:
        """[B, L, *site] fp32 start points, or None for zeros."""
        return None

    def combine(self, per_baseline: torch.Tensor) -> torch.Tensor:
        """[B, L, *site] per-baseline integrated gradients -> [L, *site] scores."""
        return per_baseline[0]

    def path_integrals(
        self,
        integrator: PathIntegrator,
        ids: Sequence[int],
        answer_token: int,
        starts: torch.Tensor | None,
        alphas: torch.Tensor,
        weights: torch.Tensor,
    ) -> PathIntegrals:
        """The weighted gradient sums along every layer's paths from ``starts`` for ``answer_token``
        predicted after ``ids``, and F at the paths' ends and starts."""
        clean = integrator.clean_run(ids, answer_token)
        return integrator.integrate(clean, starts, alphas, weights)

    def incompleteness_advice(self, steps: int, rule: str) -> str:
        """What to do where the scores miss completeness (the end of the warning)."""
        return f"the {steps}-step {rule} rule is too coarse here: raise steps or use rule midpoint or gauss"

    def scores(
        self,
        lm: LoadedModel,
        prompt: str,
        answer: str,
        steps: int,
        rule: str,
        answer_tokens: str,
        max_batch_rows: int | None,
    ) -> PathScores:
        """Scores of ``answer`` after ``prompt``. F is the probability of the answer's first token
        (a causal LM's probability of the answer being started); ``answer_tokens="all"``
        teacher-forces a multi-token answer and averages the per-token scores (attention scores
        beyond a token's own prefix count as 0)."""
        check_answer_tokens(answer_tokens)
        query = encode_query(lm, prompt, answer)
        alphas, weights = integration_points(steps, rule)
        integrator = PathIntegrator(lm, self.site, max_batch_rows)
        per_token = []
        with frozen_parameters(lm):
            for t in range(tokens_used(query, answer_tokens)):
                target = query.target_positions[t]
                starts = self.baselines(lm, query, t)
                with self.site.active(lm):
                    ids = query.input_ids[: target + 1]
                    paths = self.path_integrals(integrator, ids, query.answer_ids[t], starts, alphas, weights)
                per_token.append((paths, starts))
        return self.path_scores(query, per_token)

    def path_scores(
        self, query: EncodedQuery, per_token: Sequence[tuple[PathIntegrals, torch.Tensor | None]]
    ) -> PathScores:
        """The query's scores from each answer token's path integrals and their start points
        (None: zeros), with F and the completeness residual per token and layer."""
        scores, f_inputs, f_starts, residuals = [], [], [], []
        for paths, starts in per_token:
            start = torch.zeros_like(paths.values)[None] if starts is None else starts
            per_start = (paths.values[None] - start) * paths.grad_sums
            scores.append(self.combine(per_start))
            f_inputs.append(paths.f_input)
            f_starts.append(paths.f_start.mean(0))
            expected = (paths.f_input - paths.f_start).sum(0)
            residuals.append((per_start.flatten(2).sum(2).sum(0) - expected).abs())
        return PathScores(
            scores=_mean_padded(scores),
            f_input=torch.tensor(f_inputs),
            f_start=torch.stack(f_starts),
            completeness_residual=torch.stack(residuals),
            answer_tokens=list(query.answer_ids[: len(per_token)]),
            baselines=len(per_start),
        )

    def warn_if_incomplete(
        self, found: PathScores, prompt: str, answer: str, steps: int, rule: str, stacklevel: int = 3
    ) -> None:
        """Warn where a layer's scores miss F(input) - F(baseline) by more than RESIDUAL_WARNING of
        F(input): the integration rule is too coarse for this query. ``stacklevel`` as for
        :func:`warnings.warn`, from here: the default names the caller of the caller."""
        worst = found.completeness_residual.max(dim=0).values
        # SIG's residual sums one path per prompt token, so its tolerance does too.
        limit = RESIDUAL_WARNING * float(found.f_input.max()) * found.baselines
        if float(worst.max()) > limit and math.isfinite(limit):
            layer = int(worst.argmax())
            warnings.warn(
                f"{self.name} on {prompt!r} / {answer!r}: layer {layer}'s scores miss F(input) - "
                f"F(baseline) by {float(worst[layer]):.3g} (F(input) = {float(found.f_input.max()):.3g}); "
                + self.incompleteness_advice(steps, rule),
                stacklevel=stacklevel,
            )


def tokens_used(query: EncodedQuery, answer_tokens: str) -> int:
    """How many of the answer's tokens are attributed: the first, or all (teacher forced)."""
    return 1 if answer_tokens == "first" else len(query.answer_ids)


def _mean_padded(per_token: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of tensors that may differ in size (attention over a growing prefix), each padded
    with zeros to the largest; float32 on the CPU."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in per_token))]
    padded = []
    for tensor in per_token:
        pad = [p for have, want in zip(reversed(tensor.shape), reversed(shape)) for p in (0, want - have)]
        padded.append(torch.nn.functional.pad(tensor, pad))
    return torch.stack(padded).mean(0).float()


class NeuronMethod(PathMethod):
    """Base of IG, AMIG and SIG: attribution of the neuron activations at the target position."""

    site = NEURONS
    zero_baseline: ClassVar[bool] = False
    """Integrates from all-zero activations. Where the MLP output is normalised before the residual
    add (Gemma 2/3), F is flat along that path and the scores are degenerate (they sum to ~0)."""

    @classmethod
    def degenerate_on(cls, arch: ArchitectureSpec) -> bool:
        return cls.zero_baseline and arch.mlp_output_normalized


class IntegratedGradients(NeuronMethod):
    """IG (Dai et al. 2022): zero baseline."""

    name = "ig"
    zero_baseline = True


class AMIG(NeuronMethod):
    """Architecture-adapted multilingual IG (Chen et al. 2024a): baseline = mean over prompt words
    j of the activations with word j replaced by EOS."""

    name = "amig"

    def baselines(self, lm: LoadedModel, query: EncodedQuery, target_index: int) -> torch.Tensor:
        eos = lm.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"AMIG needs an EOS token; {lm.name!r}'s tokenizer has none")
        return word_baselines(lm, query, target_index, eos).mean(0, keepdim=True)


class SIG(NeuronMethod):
    """Sequential IG (Enguehard 2023) on neurons: one path per prompt word j from the activations
    with word j replaced by the mask (or pad, or EOS) token; each word's attribution is L2
    normalised, and the sum is scaled by the mean per-word norm (see :meth:`combine`)."""

    name = "sig"

    def baselines(self, lm: LoadedModel, query: EncodedQuery, target_index: int) -> torch.Tensor:
        tok = lm.tokenizer
        replacement = next(
            (t for t in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None), None
        )
        if replacement is None:
            raise DataError(f"SIG needs a mask, pad or EOS token; {lm.name!r}'s tokenizer has none")
        return word_baselines(lm, query, target_index, replacement)

    def combine(self, per_baseline: torch.Tensor) -> torch.Tensor:
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


class FirstOrder(NeuronMethod):
    """Gradient x activation from a method's baseline: score_l = (a_l - b_l) * dF/da_l at the input,
    IG's one-step right Riemann sum, for every layer from one forward and one backward (METHODS.md
    section 3.1). Its completeness residual is the first-order Taylor error of each layer. Several
    queries share these passes (:meth:`scores_many`); a single query is a batch of one."""

    fixed_rule = (1, "right")
    path_method: ClassVar[str]
    """The path method whose baseline it takes, and whose m = 1 right sum it is."""

    def scores(
        self,
        lm: LoadedModel,
        prompt: str,
        answer: str,
        steps: int,
        rule: str,
        answer_tokens: str,
        max_batch_rows: int | None,
    ) -> PathScores:
        (found,) = self.scores_many(lm, [(prompt, answer)], answer_tokens, max_batch_rows, batch_size=1)
        return found

    def scores_many(
        self,
        lm: LoadedModel,
        queries: Sequence[tuple[str, str]],
        answer_tokens: str,
        max_batch_rows: int | None,
        batch_size: int,
    ) -> list[PathScores]:
        """:meth:`scores` of every (prompt, answer), up to ``batch_size`` answer tokens per forward
        and backward. Only answer tokens predicted after prompts of one length share a batch (no
        padding, so every query's numbers are those of a batch of one, to rounding); F at the
        baselines, for the residual, runs in one replayed batch per group too."""
        check_answer_tokens(answer_tokens)
        if batch_size < 1:
            raise ConfigError.invalid("batch_size", batch_size, "must be at least 1")
        encoded = [encode_query(lm, prompt, answer) for prompt, answer in queries]
        by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for q, query in enumerate(encoded):
            for t in range(tokens_used(query, answer_tokens)):
                by_length[query.target_positions[t] + 1].append((q, t))
        integrator = PathIntegrator(lm, self.site, max_batch_rows)
        found: dict[tuple[int, int], tuple[PathIntegrals, torch.Tensor | None]] = {}
        with frozen_parameters(lm), self.site.active(lm):
            for length, items in by_length.items():
                for first in range(0, len(items), batch_size):
                    batch = items[first : first + batch_size]
                    starts = [self.baselines(lm, encoded[q], t) for q, t in batch]
                    clean = integrator.clean_batch(
                        [encoded[q].input_ids[:length] for q, _ in batch],
                        [encoded[q].answer_ids[t] for q, t in batch],
                        gradients=True,
                    )
                    given = [start for start in starts if start is not None]  # every query's, or none
                    stacked = torch.stack(given) if given else None
                    for item, start, paths in zip(batch, starts, integrator.input_gradients(clean, stacked)):
                        found[item] = (paths, start)
        return [
            self.path_scores(query, [found[q, t] for t in range(tokens_used(query, answer_tokens))])
            for q, query in enumerate(encoded)
        ]

    def incompleteness_advice(self, steps: int, rule: str) -> str:
        return (
            f"{self.name} is first order (the gradient at the input alone) and F is curved here: "
            "use ig or amig where these scores matter"
        )


class GradientXActivation(FirstOrder, IntegratedGradients):
    """GxA: (a_l - 0) * dF/da_l, IG's zero baseline (degenerate where IG is)."""

    name = "gxa"
    path_method = IntegratedGradients.name


class AMIGGradientXActivation(FirstOrder, AMIG):
    """GxA from AMIG's baseline: (a_l - b_l) * dF/da_l, b_l the mean activation with one prompt word
    replaced by EOS."""

    name = "gxa-amig"
    path_method = AMIG.name


class AttentionIG(PathMethod):
    """IG of the attention probabilities (the paper's section 3.2): each layer's probabilities, all
    heads at once, scaled by alpha from 0 (no renormalisation)."""

    name = "attention-ig"
    site = ATTENTION


METHODS: dict[str, type[NeuronMethod]] = {
    m.name: m for m in (IntegratedGradients, AMIG, SIG, GradientXActivation, AMIGGradientXActivation)
}


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
    with NEURONS.record(lm, positions=torch.full_like(rows, target)) as acts:
        lm.model(input_ids=ids, logits_to_keep=1)  # only the activations are needed
    return torch.stack([acts[layer].cpu() for layer in range(lm.num_layers)], dim=1).float()


@dataclass
class Attribution:
    """Neuron scores of one (prompt, answer) query; ``scores`` is float32 [num_layers, d_ff] on the CPU."""

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
    params: dict[str, Any] = field(default_factory=dict)

    def kn_set(
        self, threshold: float = DEFAULT_KN_THRESHOLD, top_k: int | None = None
    ) -> list[tuple[int, int]]:
        return kn_set(self.scores, threshold, top_k)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        return [(layer, i, float(self.scores[layer, i])) for layer, i in top_k(self.scores, k)]


@dataclass
class AttentionAttribution:
    """Attention scores of one (prompt, answer) query; ``scores`` is float32 [L, heads, T, T] on the
    CPU, T = prompt tokens (plus teacher-forced answer tokens where the answer has several)."""

    prompt: str
    answer: str
    answer_tokens: list[int]
    scores: torch.Tensor
    f_input: torch.Tensor
    """F at the input, per answer token used: [tokens]."""
    f_zero: torch.Tensor
    """F with layer l's attention probabilities all 0, per token and layer: [tokens, L]."""
    completeness_residual: torch.Tensor
    """|sum of layer l's scores - (F(input) - F(zero))| per token and layer: [tokens, L]."""
    steps: int
    rule: str

    def synapses(self, threshold: float = DEFAULT_SYNAPSE_THRESHOLD) -> list[tuple[Synapse, float]]:
        return knowledge_synapses(self.scores, threshold)


def kn_set(
    scores: torch.Tensor, threshold: float = DEFAULT_KN_THRESHOLD, top_k_neurons: int | None = None
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


def knowledge_synapses(
    scores: torch.Tensor, threshold: float = DEFAULT_SYNAPSE_THRESHOLD
) -> list[tuple[Synapse, float]]:
    """KS = {(l, h, i, j) : S >= tau * max S} with their scores, best first; empty where no score
    is positive."""
    peak = float(scores.max())
    if peak <= 0:
        return []
    found = []
    for row in torch.nonzero(scores >= threshold * peak):
        layer, head, i, j = (int(v) for v in row)
        found.append(((layer, head, i, j), float(scores[layer, head, i, j])))
    return sorted(found, key=lambda item: -item[1])


def attribute(
    lm: LoadedModel,
    prompt: str,
    answer: str,
    method: str = "ig",
    steps: int | None = None,
    rule: str | None = None,
    answer_tokens: str | None = None,
    max_batch_rows: int | None = None,
    warn: bool = True,
    *,
    settings: PathSettings | None = None,
) -> Attribution:
    """Attribution scores of every neuron for ``answer`` after ``prompt`` (METHODS.md section 3),
    with ``settings`` (an :class:`AttributionSettings` too; default: the defaults) and any of
    ``steps``, ``rule`` and ``answer_tokens`` given in their place. ``warn``: about a method
    degenerate on the model and about scores that miss completeness (a sweep turns it off: it
    stores every query's residual instead). The first-order methods (gxa, gxa-amig) have one rule,
    the one-step right sum: they ignore ``steps`` and ``rule`` and record 1 and right."""
    path = path_settings(settings, steps, rule, answer_tokens)
    algorithm, steps, rule = _method(lm, method, path, warn)
    found = algorithm.scores(lm, prompt, answer, steps, rule, path.answer_tokens, max_batch_rows)
    return _attribution(algorithm, found, prompt, answer, steps, rule, path.answer_tokens, warn)


FIRST_ORDER_BATCH = 32
"""Queries per forward and backward of a first-order method in :func:`attribute_many`. On a CPU a
one-query pass is bound by reading the weights: 8 queries of one length per pass took a third of
the time per query, 32 a quarter, 64 little less (smollm2-135m, benchmarks/NOTES.md)."""


def attribute_many(
    lm: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    method: str = "ig",
    steps: int | None = None,
    rule: str | None = None,
    answer_tokens: str | None = None,
    max_batch_rows: int | None = None,
    warn: bool = True,
    batch_size: int = FIRST_ORDER_BATCH,
    *,
    settings: PathSettings | None = None,
) -> list[Attribution]:
    """:func:`attribute` for each (prompt, answer), the same numbers (to fp32 rounding). The
    first-order methods (gxa, gxa-amig) batch up to ``batch_size`` queries whose prompts have one
    token length into each forward and backward, which is where their speed is; a path method runs
    query by query, its rows already filling each batch."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    path = path_settings(settings, steps, rule, answer_tokens)
    answer_tokens = path.answer_tokens
    algorithm, steps, rule = _method(lm, method, path, warn)
    if isinstance(algorithm, FirstOrder):
        queries = list(zip(prompts, answers))
        found = algorithm.scores_many(lm, queries, answer_tokens, max_batch_rows, batch_size)
    else:
        found = [
            algorithm.scores(lm, p, a, steps, rule, answer_tokens, max_batch_rows)
            for p, a in zip(prompts, answers)
        ]
    return [
        _attribution(algorithm, scores, p, a, steps, rule, answer_tokens, warn)
        for scores, p, a in zip(found, prompts, answers)
    ]


def _method(lm: LoadedModel, method: str, path: PathSettings, warn: bool) -> tuple[NeuronMethod, int, str]:
    """The method's algorithm and the steps and rule it runs with, once it is checked and, with
    ``warn``, a method degenerate on the model is warned about."""
    if method not in METHODS:
        raise ConfigError.invalid("method", method, f"choose {', '.join(METHODS)}")
    algorithm = METHODS[method]()
    steps, rule = algorithm.fixed_rule or (path.steps, path.rule)
    if warn and algorithm.degenerate_on(lm.arch):
        warnings.warn(
            f"{lm.name!r} ({lm.arch.family}) normalises the MLP output before the residual add, so F is "
            f"flat in a uniform scaling of the activations and {method} scores (a zero baseline) sum "
            "to about 0. AMIG and SIG (non-zero baselines; gxa-amig too) remain meaningful on this model.",
            stacklevel=3,
        )
    return algorithm, steps, rule


def _attribution(
    algorithm: NeuronMethod,
    found: PathScores,
    prompt: str,
    answer: str,
    steps: int,
    rule: str,
    answer_tokens: str,
    warn: bool,
) -> Attribution:
    """The result of one query, warned about where it misses completeness (with ``warn``)."""
    if warn:
        algorithm.warn_if_incomplete(found, prompt, answer, steps, rule, stacklevel=4)
    params = {"method": algorithm.name, "steps": steps, "rule": rule, "answer_tokens": answer_tokens}
    return Attribution(
        method=algorithm.name,
        f_baseline=found.f_start,
        params={**params, "baselines": found.baselines},
        **found.result_fields(prompt, answer, steps, rule),
    )


def attribute_attention(
    lm: LoadedModel, prompt: str, answer: str, steps: int | None = None, rule: str | None = None,
    answer_tokens: str | None = None, max_batch_rows: int | None = None, warn: bool = True, *,
    settings: PathSettings | None = None,
) -> AttentionAttribution:  # fmt: skip
    """Integrated-gradient scores of every attention probability for ``answer`` after ``prompt``
    (METHODS.md section 7); ``settings``, the keyword arguments in their place and ``warn`` as for
    :func:`attribute`."""
    path = path_settings(settings, steps, rule, answer_tokens)
    algorithm = AttentionIG()
    found = algorithm.scores(lm, prompt, answer, path.steps, path.rule, path.answer_tokens, max_batch_rows)
    if warn:
        algorithm.warn_if_incomplete(found, prompt, answer, path.steps, path.rule)
    result = found.result_fields(prompt, answer, path.steps, path.rule)
    return AttentionAttribution(f_zero=found.f_start, **result)
