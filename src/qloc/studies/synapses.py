"""Knowledge synapses (``qloc synapses``; METHODS.md section 7, the paper's section 3.2).

The knowledge synapses of a query are its attention probabilities whose integrated-gradient score
(:func:`qloc.engine.attribution.attribute_attention`) reaches tau * max (tau = 0.3).

The experiment, per query q of a fact: suppress (x0) or enhance (x2) q's synapses and measure, at
q's target position, the relative change of the mean activation of q's KNs, of the neighbour KNs
(other queries' KNs not in K_q) and of |K_q| random neurons in no KN set of the fact (seeded),
and the relative change of the answer's probability. Under Query Localization, suppressing the
synapses lowers q's KN activations much more than the others', and the answer's probability.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from ..data.pararel import Fact
from ..engine.attribution import (
    DEFAULT_SYNAPSE_THRESHOLD,
    AttentionAttribution,
    PathSettings,
    attribute_attention,
)
from ..engine.models import LoadedModel
from ..engine.sites import ATTENTION, NEURONS, Synapse
from ..engine.tokens import EncodedQuery, encode_query
from ..errors import DataError, QlocError
from ..runs.executors import execute
from ..runs.profiling import memory_measure, peak_memory
from ..runs.rows import Row, UnitWriter
from ..runs.store import RunStore
from ..runs.sweep import SkipFact, WorkFn
from ..settings import flat_params, setting
from . import synapse_claims
from .knrows import QueryRow
from .knsets import (
    FactKNSets,
    ManipulationConfig,
    Neuron,
    random_neurons,
)
from .localize_run import LocalizedRequest
from .registry import Outcome, Panel, Reproduction, Study
from .synapse_tables import MEASURES, cost_table, effects_table, write_synapse_report


@dataclass(frozen=True)
class SynapseConfig(ManipulationConfig):
    """The synapse stage's parameters."""

    stage_name = "synapses"
    path: PathSettings = setting(factory=PathSettings)
    """Steps, rule and answer tokens of the attention attribution (``--steps``, ``--rule``,
    ``--answer-tokens``), checked there."""
    threshold: float = setting(
        DEFAULT_SYNAPSE_THRESHOLD, "Knowledge synapses: score >= threshold * max score."
    )

    def params(self) -> dict[str, Any]:
        """The stage's parameters as a run stores them: the path settings flat among the others
        (``steps``, ``rule``, ``answer_tokens``), as runs made before they were grouped stored them."""
        return flat_params(self)


def _relative_change(before: float, after: float) -> float:
    return (after - before) / abs(before) if before != 0 else float("nan")


def _neuron_classes(
    known: FactKNSets, query: int, shape: tuple[int, int], rng: random.Random
) -> dict[str, list[Neuron]]:
    own = sorted(set(known.query_sets[query]))
    everything = known.neurons
    chosen = random_neurons(len(own), shape, everything, rng)
    return {"kn": own, "neighbour": sorted(everything - set(own)), "random": chosen}


def heatmap_neurons(known: FactKNSets, limit: int = 64) -> list[Neuron]:
    """Columns of a fact's heatmap (Figures 5, 10): the KNs of its queries, those in the most
    queries' sets first, at most ``limit``, then ordered by (layer, neuron)."""
    counts = Counter(u for s in known.query_sets for u in set(s))
    chosen = sorted(counts, key=lambda u: (-counts[u], u))[:limit]
    return sorted(chosen)


@dataclass
class SynapseRow(QueryRow):
    """One query's knowledge synapses, and the KNs its fact's heatmap shows."""

    table = "synapses"
    class_: str
    n_synapses: int
    synapses: list[list[float]]
    """(layer, head, query position, key position, score), best first."""
    f_input: float
    max_residual: float
    heatmap_neurons: list[list[int]]


@dataclass
class SynapseEffectRow(Row):
    """One query under one operation on its synapses: cost, P(answer) and the relative change of the
    mean activation (and mean |activation|) of each neuron class."""

    table = "synapse_effects"
    fact_id: str
    relation: str
    method: str
    class_: str
    query_index: int
    operation: str
    n_synapses: int
    seconds: float
    peak_mb: float
    memory_measure: str
    prob: float
    dprob: float
    heatmap: list[float]
    n_kn: int
    dkn_kn: float
    dkn_kn_abs: float
    n_neighbour: int
    dkn_neighbour: float
    dkn_neighbour_abs: float
    n_random: int
    dkn_random: float
    dkn_random_abs: float


@dataclass
class _Probe:
    """What one forward pass of a query's prefix measured, under one operation on its synapses."""

    activations: torch.Tensor
    """(layers, d_ff) activations at the first answer token's position."""
    prob: float
    seconds: float
    memory: dict[str, float]


def _probe(lm: LoadedModel, query: EncodedQuery, chosen: list[Synapse], factor: float) -> _Probe:
    """One forward pass up to the first answer token, with the ``chosen`` synapses scaled by
    ``factor``; with none chosen it measures the unmodified model under the same probes."""
    target = query.target_positions[0]
    ids = torch.tensor([list(query.input_ids[: target + 1])], device=lm.device)
    position = torch.tensor([target])
    with (
        torch.no_grad(),
        ATTENTION.scale(lm, chosen, factor),
        NEURONS.record(lm, positions=position) as acts,
        peak_memory(lm.device) as memory,
    ):
        started = time.perf_counter()
        logits = lm.model(input_ids=ids, logits_to_keep=1).logits
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)  # CUDA runs asynchronously: time the work, not its launch
        seconds = time.perf_counter() - started
    activations = torch.stack([acts[layer][0].cpu() for layer in range(lm.num_layers)]).float()
    prob = float(torch.softmax(logits[0, -1].float(), -1)[query.answer_ids[0]])
    return _Probe(activations, prob, seconds, memory)


def _class_changes(
    before: torch.Tensor, after: torch.Tensor, classes: dict[str, list[Neuron]]
) -> dict[str, Any]:
    """Per neuron class: its size and the relative change of its mean activation and of its mean
    |activation| (NaN for an empty class)."""
    changes: dict[str, Any] = {}
    for name, neurons in classes.items():
        changes[f"n_{name}"] = len(neurons)
        if neurons:
            layers, cols = map(list, zip(*neurons))
            old, new = before[layers, cols], after[layers, cols]
            changes[f"dkn_{name}"] = _relative_change(float(old.mean()), float(new.mean()))
            changes[f"dkn_{name}_abs"] = _relative_change(float(old.abs().mean()), float(new.abs().mean()))
        else:
            changes[f"dkn_{name}"] = changes[f"dkn_{name}_abs"] = float("nan")
    return changes


@dataclass(frozen=True)
class SynapseWorkBuilder:
    """The synapse sweep's :data:`~qloc.runs.executors.WorkBuilder`: each model replica builds its
    :class:`SynapseWork` from it (a dataclass, so that Ray pickles it)."""

    config: SynapseConfig
    knowledge: dict[str, FactKNSets]
    max_batch_rows: int | None = None
    classes: dict[str, str] | None = None
    """A stratified sample's classes (:attr:`qloc.studies.localize_run.FactSample.classes`); None:
    each fact's static class."""

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return SynapseWork(lm, self)


@dataclass
class SynapseWork:
    """Per-fact work function for :func:`qloc.runs.sweep.run_sweep` on one model replica: KS of every
    query, then for each operation (none / suppress / enhance) the KN activation changes, dProb,
    time and memory."""

    lm: LoadedModel
    plan: SynapseWorkBuilder

    @property
    def factors(self) -> dict[str, float]:
        """Operation -> factor on the synapses; "none" comes first, as the baseline the others
        are measured against."""
        return {"none": 1.0, "suppress": self.plan.config.suppress, "enhance": self.plan.config.enhance}

    def __call__(self, fact: Fact, writer: UnitWriter) -> None:
        known = self.plan.knowledge[fact.id]
        fact_class = (
            self.plan.classes[fact.id]
            if self.plan.classes
            else known.knowledge_class(self.plan.config.static_threshold)
        )
        rng = random.Random(f"{self.plan.config.seed}:{fact.id}")
        columns = heatmap_neurons(known)
        shape = (self.lm.num_layers, self.lm.d_ff)
        for index, prompt in enumerate(fact.queries):
            query, scores = self._attribute(fact, prompt)
            synapses = scores.synapses(self.plan.config.threshold)
            key: dict[str, Any] = {
                "fact_id": fact.id,
                "relation": fact.relation,
                "method": self.plan.config.method,
                "query_index": index,
            }
            writer.add(
                SynapseRow(
                    **key,
                    prompt=prompt,
                    answer=fact.object,
                    class_=fact_class,
                    n_synapses=len(synapses),
                    synapses=[[*s, v] for s, v in synapses],
                    f_input=float(scores.f_input[0]),
                    max_residual=float(scores.completeness_residual.max()),
                    heatmap_neurons=[list(u) for u in columns],
                )
            )
            classes = _neuron_classes(known, index, shape, rng)
            writer.add(self._effect_rows(query, synapses, classes, columns, {**key, "class_": fact_class}))

    def _attribute(self, fact: Fact, prompt: str) -> tuple[EncodedQuery, AttentionAttribution]:
        """The query's tokens and its attention scores; an answer that cannot be tokenized skips
        the whole fact."""
        try:
            query = encode_query(self.lm, prompt, fact.object)
            scores = attribute_attention(
                self.lm,
                prompt,
                fact.object,
                max_batch_rows=self.plan.max_batch_rows,
                warn=False,  # the residual is stored with every query
                settings=self.plan.config.path,
            )
        except DataError as exc:
            raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
        return query, scores

    def _effect_rows(
        self,
        query: EncodedQuery,
        synapses: list[tuple[Synapse, float]],
        classes: dict[str, list[Neuron]],
        columns: list[Neuron],
        key: dict[str, Any],
    ) -> list[SynapseEffectRow]:
        """One row per operation on the query's synapses, each against the unmodified pass."""
        target = query.target_positions[0]
        # The measurements are of the first answer token's prediction; synapses at later
        # (teacher-forced answer) positions of a multi-token answer cannot act on it.
        in_prefix = [s for s, _ in synapses if s[2] <= target]
        rows = []
        measured: dict[str, _Probe] = {}
        for operation, factor in self.factors.items():
            chosen = in_prefix if operation != "none" else []
            probe = measured[operation] = _probe(self.lm, query, chosen, factor)
            baseline = measured["none"]
            rows.append(
                SynapseEffectRow(
                    **key,
                    operation=operation,
                    n_synapses=len(chosen),
                    seconds=probe.seconds,
                    peak_mb=probe.memory["peak_mb"],
                    memory_measure=memory_measure(self.lm.device),
                    prob=probe.prob,
                    dprob=_relative_change(baseline.prob, probe.prob) if operation != "none" else 0.0,
                    heatmap=[float(probe.activations[layer, i]) for layer, i in columns],
                    **_class_changes(baseline.activations, probe.activations, classes),
                )
            )
        return rows


@dataclass(frozen=True)
class SynapseRequest(LocalizedRequest):
    config: SynapseConfig = setting(factory=SynapseConfig)
    heatmaps: int = setting(3, "Facts drawn as KN-activation heatmaps (Figures 5, 10).")
    max_batch_rows: int | None = setting(None)


def run(request: SynapseRequest) -> Outcome:
    localized = request.read()
    config = replace(request.config, method=localized.method)
    sample = request.sample(localized, config.seed)
    build = SynapseWorkBuilder(config, localized.knowledge, request.max_batch_rows, sample.classes)
    params = {**config.params(), **sample.params}
    plan = localized.sweep(config.stage, params, build, f"synapses {localized.method}", sample.facts)
    summary = execute(plan, request.execution)
    with RunStore.open_existing(request.run_dir) as store:
        if "synapse_effects" not in store.tables():
            raise QlocError(
                f"no fact of {str(request.run_dir)!r} could be processed ({dict(summary.skip_reasons)})"
            )
        found, effects = store.frame(SynapseRow), store.frame(SynapseEffectRow)
    written = write_synapse_report(found, effects, request.run_dir, request.heatmaps)
    shown: list[str | pd.DataFrame] = []
    for measure in MEASURES:
        shown += [f"dKN measure: {measure}", effects_table(effects, measure)]
    shown.append(cost_table(effects))
    shown += [f"{name}: {path}" for name, path in written.items()]
    return Outcome([*shown, f"facts: {summary.describe()}{sample.note}"])


SYNAPSE_FACTS = {"sample": 2, "full": None}
"""Facts ``qloc reproduce`` runs the synapse experiment on, per scale."""


def reproduce(plan: Reproduction) -> list[tuple[str, Any]]:
    request = SynapseRequest(
        plan.directory,
        method=plan.method,
        device=plan.device,
        execution=plan.execution,
        config=SynapseConfig(seed=plan.seed),
        limit=SYNAPSE_FACTS[plan.scale],
    )
    return [("knowledge synapses", request)]


STUDY = Study(
    name="synapses",
    summary="Knowledge synapses: attribute every attention probability of every query (integrated "
    "gradients), take those above threshold x max, suppress (x0) and enhance (x2) them, and measure "
    "the change of the query's KN activations, of neighbour KNs, of random non-KNs and of the answer's "
    "probability (Figures 5, 6, 10, 11; Table 6). Resumable per fact.",
    request=SynapseRequest,
    run=run,
    panels=(
        Panel(
            80,
            "Figures 6/11: knowledge synapses and KN activations",
            ("fig6_synapses",),
            ("fig6_synapses", "fig11_dkn_distributions"),
        ),
        Panel(
            85,
            "Figures 6/11 with dKN of mean |activation|",
            ("fig6_synapses_magnitude",),
            ("fig6_synapses_magnitude", "fig11_dkn_distributions_magnitude"),
        ),
        Panel(
            90,
            "Figures 5/10: KN activations of neighbour queries, none / KS suppressed / KS enhanced",
            (),
            ("fig5_heatmap", "fig10_heatmap_*"),
        ),
        Panel(100, "Table 6: cost of suppressing and enhancing synapses", ("table6_cost",)),
    ),
    captions=synapse_claims.CAPTIONS,
    claims=synapse_claims.SynapseClaims,
    examples=(
        "qloc synapses --run-dir runs/smollm2 --limit 8           "
        "# Figures 5, 6, 10, 11 and Table 6: knowledge synapses",
    ),
    reproduce=reproduce,
)
