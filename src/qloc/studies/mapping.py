"""The query-KN mapping experiment (``qloc mapping``; METHODS.md section 6, the paper's Figure 4).

For each query q of a fact, five neuron sets are suppressed (activation x 0) or enhanced (x 2) at
q's target position, and the relative change of the answer's probability is recorded:
Self = K_q; Union, Intersection and Refine (in >= 2 sets) of the other queries' KN sets; and
Unrelated = |K_q| random neurons in none of the fact's KN sets (seeded). Under Query Localization
Self moves the answer most, and for KI facts the other queries' Intersection least.

The KN sets go through the shared-neuron filter first (:func:`qloc.studies.knsets.shared_neurons`), as
for editing. A set that is empty changes nothing (dProb 0 exactly): its row is stored, but tables
leave it out of the statistics and count such sets instead. A handful of near-zero probabilities
can decide a mean of relative changes, so tables give the median and a bootstrap interval of the
mean beside it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..data.pararel import Fact
from ..engine.cloze import score_cloze
from ..engine.editing import Neuron
from ..engine.models import LoadedModel
from ..engine.sites import NEURONS
from ..engine.tokens import encode_query
from ..errors import DataError
from ..runs.executors import execute
from ..runs.outputs import pyplot, save_figure, write_table
from ..runs.rows import Row, UnitWriter
from ..runs.store import RunStore
from ..runs.sweep import SkipFact, WorkFn
from ..settings import setting
from . import mapping_claims
from .knsets import (
    SHARED_FILTER,
    SHARED_FILTER_MIN_FACTS,
    SHARED_MIN_FACTS_HELP,
    SHARED_REFERENCE_HELP,
    FactKNSets,
    ManipulationConfig,
    SharedNeuronFilter,
    check_share,
    random_neurons,
    reference_param,
)
from .localize_run import LocalizedRequest
from .registry import Outcome, Panel, Reproduction, Study
from .statistics import bootstrap_mean_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SETS = ("self", "union", "intersection", "refine", "unrelated")


@dataclass(frozen=True)
class MappingConfig(ManipulationConfig):
    """The mapping stage's parameters."""

    stage_name = "mapping"
    shared_filter: float | None = setting(SHARED_FILTER, word="off")
    """Drop KNs held by more than this share of the relation's facts first; None: off."""
    shared_min_facts: int = setting(SHARED_FILTER_MIN_FACTS, SHARED_MIN_FACTS_HELP)
    shared_reference: Path | None = setting(None, SHARED_REFERENCE_HELP)

    def __post_init__(self) -> None:
        check_share(self.shared_filter)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "shared_reference": reference_param(self.shared_reference)}


def mapping_sets(
    kn_sets: list[list[Neuron]],
    query: int,
    shape: tuple[int, int],
    rng: random.Random,
    exclude: set[Neuron] | frozenset[Neuron] = frozenset(),
) -> dict[str, list[Neuron]]:
    """The five sets for query index ``query`` of a fact whose per-query KN sets are ``kn_sets``;
    ``shape`` = (num_layers, d_ff) for drawing Unrelated neurons, which avoid ``exclude`` too (the
    KNs a filter removed are not unrelated to the fact)."""
    own = sorted(set(kn_sets[query]))
    others = [set(s) for i, s in enumerate(kn_sets) if i != query]
    counts = Counter(u for s in others for u in s)
    everything = set().union(*map(set, kn_sets)) | set(exclude)
    return {
        "self": own,
        "union": sorted(set().union(*others)) if others else [],
        "intersection": sorted(set.intersection(*others)) if others else [],
        "refine": sorted(u for u, c in counts.items() if c >= 2),
        "unrelated": random_neurons(len(own), shape, everything, rng),
    }


@dataclass
class MappingRow(Row):
    """One query's answer probability before and after one operation on one neuron set."""

    table = "mapping"
    fact_id: str
    relation: str
    method: str
    class_: str
    query_index: int
    kn_set: str
    operation: str
    set_size: int
    self_dropped: int
    """KNs of the query's own set that the shared-neuron filter removed."""
    prob_before: float
    prob_after: float
    dprob: float


def mapping_work(
    lm: LoadedModel,
    config: MappingConfig,
    knowledge: dict[str, FactKNSets],
    shared: SharedNeuronFilter,
    classes: Mapping[str, str] | None = None,
) -> WorkFn:
    """Per-fact work function for :func:`qloc.runs.sweep.run_sweep`; ``classes``: a stratified sample's
    (:attr:`qloc.studies.localize_run.FactSample.classes`), else each fact's static class."""
    shape = (lm.num_layers, lm.d_ff)
    filtered = shared.apply(knowledge)

    def work(fact: Fact, writer: UnitWriter) -> None:
        original, known = knowledge[fact.id], filtered[fact.id]
        fact_class = classes[fact.id] if classes else original.knowledge_class(config.static_threshold)
        rng = random.Random(f"{config.seed}:{fact.id}")
        for index, prompt in enumerate(fact.queries):
            try:
                query = encode_query(lm, prompt, fact.object)
            except DataError as exc:
                raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
            # P before and after from the same unbatched call, so an empty set gives dProb 0 exactly.
            prob_before = score_cloze(lm, [prompt], [fact.object])[0].prob
            position = torch.tensor([query.target_positions[0]])
            dropped = len(original.query_sets[index]) - len(known.query_sets[index])
            for set_name, neurons in mapping_sets(
                known.query_sets, index, shape, rng, original.neurons
            ).items():
                for operation, factor in (("suppress", config.suppress), ("enhance", config.enhance)):
                    with NEURONS.scale(lm, neurons, factor, positions=position):
                        after = score_cloze(lm, [prompt], [fact.object])[0].prob
                    dprob = (after - prob_before) / prob_before if prob_before > 0 else float("nan")
                    writer.add(
                        MappingRow(
                            fact.id,
                            fact.relation,
                            config.method,
                            fact_class,
                            index,
                            set_name,
                            operation,
                            len(neurons),
                            dropped,
                            prob_before,
                            after,
                            dprob,
                        )
                    )

    return work


@dataclass(frozen=True)
class MappingWorkBuilder:
    """The mapping sweep's :data:`~qloc.runs.executors.WorkBuilder`: each model replica builds
    :func:`mapping_work` from it (a dataclass, so that Ray pickles it)."""

    config: MappingConfig
    knowledge: dict[str, FactKNSets]
    shared: SharedNeuronFilter
    classes: Mapping[str, str] | None = None

    def __call__(self, lm: LoadedModel) -> WorkFn:
        return mapping_work(lm, self.config, self.knowledge, self.shared, self.classes)


def mapping_table(mapping: pd.DataFrame) -> pd.DataFrame:
    """dProb per (method, operation, set, class), and "Avg" over all facts' queries: mean, median and
    bootstrap 95 % interval of the mean over the queries whose set was not empty, all the queries,
    and how many of the sets were empty. An empty set changes nothing by construction; counting its
    dProb of 0 would pull a set's mean towards 0 by how often the filter or the set's rule empties it
    (Intersection and Refine most), which says nothing about what its neurons do."""
    mapping = mapping.assign(empty=mapping["set_size"] == 0)
    keys = ["method", "operation", "kn_set"]
    parts = [
        mapping.groupby(keys + ["class"], sort=False),
        mapping.assign(**{"class": "Avg"}).groupby(keys + ["class"], sort=False),
    ]
    rows = []
    for grouped in parts:
        for key, group in grouped:
            measured = group.loc[~group["empty"], "dprob"]
            low, high = bootstrap_mean_ci(measured)
            rows.append(
                {
                    **dict(zip(keys + ["class"], key)),
                    "dprob": measured.mean(),
                    "dprob_median": measured.median(),
                    "ci_low": low,
                    "ci_high": high,
                    "queries": len(group),
                    "empty_sets": int(group["empty"].sum()),
                }
            )
    table = pd.DataFrame(rows)
    table["set_order"] = table["kn_set"].map({s: i for i, s in enumerate(SETS)})
    table["class_order"] = table["class"].map({"KC": 0, "KI": 1, "Avg": 2})
    table = table.sort_values(["method", "operation", "class_order", "set_order"])
    return table.drop(columns=["set_order", "class_order"]).reset_index(drop=True)


def _class_label(part: pd.DataFrame, fact_class: str) -> str:
    """A class's tick label, with how many of its queries had each set empty (left out of the bar)."""
    empty = part[part["class"] == fact_class].groupby("kn_set", sort=False)["empty_sets"].sum()
    counts = [f"{name.capitalize()} {int(count)}" for name, count in empty.items() if count > 0]
    return "\n".join([fact_class, "empty sets:", *counts]) if counts else fact_class


def mapping_figure(table: pd.DataFrame) -> Figure:
    """Figure 4: bars of mean dProb per set over the queries whose set is not empty, grouped by
    class, one panel per operation; each class's label counts the empty sets left out."""
    plt = pyplot()
    operations = list(dict.fromkeys(table["operation"]))
    classes = [c for c in ("KC", "KI", "Avg") if c in set(table["class"])]
    fig, axes = plt.subplots(1, len(operations), figsize=(5.5 * len(operations), 3.8), squeeze=False)
    width = 0.8 / len(SETS)
    for ax, operation in zip(axes[0], operations):
        part = table[table["operation"] == operation]
        for k, set_name in enumerate(SETS):
            rows = [part[(part["class"] == c) & (part["kn_set"] == set_name)] for c in classes]
            values = [r["dprob"].mean() for r in rows]
            if "ci_low" in part:  # whiskers: the bootstrap 95 % interval of the mean
                errors = [
                    [v - r["ci_low"].mean() for v, r in zip(values, rows)],
                    [r["ci_high"].mean() - v for v, r in zip(values, rows)],
                ]
            else:
                errors = None
            ax.bar(
                [i + (k - 2) * width for i in range(len(classes))],
                values,
                width,
                label=set_name.capitalize(),
                yerr=errors,
                capsize=2,
                error_kw={"linewidth": 0.7},
            )
        ax.axhline(0, color="black", linewidth=0.6)
        if part["dprob"].abs().max() > 10:  # enhancing can multiply a tiny probability many times
            ax.set_yscale("symlog", linthresh=1)
        ax.set_xticks(range(len(classes)), [_class_label(part, c) for c in classes], fontsize=7)
        ax.set_ylabel("dProb (relative; mean, 95 % CI)")
        ax.set_title(f"{operation.capitalize()} KN sets ({', '.join(sorted(set(part['method'])))})")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(SETS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


@dataclass(frozen=True)
class MappingRequest(LocalizedRequest):
    config: MappingConfig = setting(factory=MappingConfig)


def run(request: MappingRequest) -> Outcome:
    localized = request.read()
    config = replace(request.config, method=localized.method)
    shared = localized.shared_filter(config.shared_filter, config.shared_reference, config.shared_min_facts)
    sample = request.sample(localized, config.seed)
    build = MappingWorkBuilder(config, localized.knowledge, shared, sample.classes)
    params = {**config.params(), **sample.params}
    plan = localized.sweep(config.stage, params, build, f"mapping {localized.method}", sample.facts)
    summary = execute(plan, request.execution)
    with RunStore.open_existing(request.run_dir) as store:
        table = mapping_table(store.frame(MappingRow))
    csv = write_table(table, request.run_dir / "tables", "fig4_mapping")
    png = save_figure(mapping_figure(table), request.run_dir / "figures", "fig4_mapping")
    filtered = shared.report(localized.knowledge, ("self", "union"))
    return Outcome([table, filtered, f"facts: {summary.describe()}{sample.note}; {csv}, {png}"])


def reproduce(plan: Reproduction) -> list[tuple[str, Any]]:
    config = MappingConfig(seed=plan.seed)
    request = MappingRequest(
        plan.directory, method=plan.method, device=plan.device, execution=plan.execution, config=config
    )
    return [("query-KN mapping", request)]


STUDY = Study(
    name="mapping",
    summary="The query-KN mapping experiment (Figure 4): suppress (x0) and enhance (x2) the Self, Union, "
    "Intersection, Refine and Unrelated sets of every query; dProb per set and class (mean, median, "
    "bootstrap 95 % interval).",
    request=MappingRequest,
    run=run,
    panels=(Panel(70, "Figure 4: query-KN mapping", ("fig4_mapping",), ("fig4_mapping",)),),
    captions=mapping_claims.CAPTIONS,
    claims=mapping_claims.MappingClaims,
    examples=(
        "qloc mapping --run-dir runs/smollm2                      "
        "# Figure 4: the query-KN mapping experiment",
    ),
    reproduce=reproduce,
)
