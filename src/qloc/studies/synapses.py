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
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.pararel import Fact
from ..engine.attribution import attribute_attention, check_answer_tokens
from ..engine.models import LoadedModel
from ..engine.paths import integration_points
from ..engine.sites import ATTENTION, NEURONS
from ..engine.tokens import encode_query
from ..errors import DataError, QlocError
from ..runs.profiling import memory_measure, peak_memory
from ..runs.store import UnitWriter
from ..runs.sweep import SkipFact
from .consistency import STATIC_THRESHOLD
from .knsets import FactKnowledge
from .statistics import bootstrap_mean_ci

OPERATIONS = ("none", "suppress", "enhance")
NEURON_CLASSES = ("kn", "neighbour", "random")
Neuron = tuple[int, int]


# -- the experiment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynapseConfig:
    method: str = "ig"
    """Whose KN sets (from the localize run) are the query's KNs."""
    steps: int = 20
    rule: str = "right"
    answer_tokens: str = "first"
    threshold: float = 0.3
    """KS: S >= threshold * max S (METHODS.md section 7)."""
    suppress: float = 0.0
    enhance: float = 2.0
    static_threshold: float = STATIC_THRESHOLD
    """KC/KI split of the fact (relaxed CS), as in the consistency study."""
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject bad settings before they are stored as the run's parameters."""
        integration_points(self.steps, self.rule)
        check_answer_tokens(self.answer_tokens)

    @property
    def stage(self) -> str:
        return f"synapses-{self.method}"

    def params(self) -> dict:
        return asdict(self)


def _relative_change(before: float, after: float) -> float:
    return (after - before) / abs(before) if before != 0 else float("nan")


def _neuron_classes(
    known: FactKnowledge, query: int, shape: tuple[int, int], rng: random.Random
) -> dict[str, list[Neuron]]:
    own = sorted(set(known.query_sets[query]))
    everything = set().union(*map(set, known.query_sets))
    free = shape[0] * shape[1] - len(everything)
    chosen: set[Neuron] = set()
    while len(chosen) < min(len(own), free):
        candidate = (rng.randrange(shape[0]), rng.randrange(shape[1]))
        if candidate not in everything:
            chosen.add(candidate)
    return {"kn": own, "neighbour": sorted(everything - set(own)), "random": sorted(chosen)}


def heatmap_neurons(known: FactKnowledge, limit: int = 64) -> list[Neuron]:
    """Columns of a fact's heatmap (Figures 5, 10): the KNs of its queries, those in the most
    queries' sets first, at most ``limit``, then ordered by (layer, neuron)."""
    counts = Counter(u for s in known.query_sets for u in set(s))
    chosen = sorted(counts, key=lambda u: (-counts[u], u))[:limit]
    return sorted(chosen)


def synapse_work(
    lm: LoadedModel,
    config: SynapseConfig,
    knowledge: dict[str, FactKnowledge],
    max_batch_rows: int | None = None,
):
    """Per-fact work function for :func:`qloc.sweep.run_sweep`: KS of every query, then for each
    operation (none / suppress / enhance) the KN activation changes, dProb, time and memory."""
    shape = (lm.num_layers, lm.d_ff)
    factors = {"none": 1.0, "suppress": config.suppress, "enhance": config.enhance}

    def work(fact: Fact, writer: UnitWriter) -> None:
        known = knowledge[fact.id]
        kind = known.knowledge_class(config.static_threshold)
        rng = random.Random(f"{config.seed}:{fact.id}")
        columns = heatmap_neurons(known)
        for index, prompt in enumerate(fact.queries):
            try:
                query = encode_query(lm, prompt, fact.object)
                with warnings.catch_warnings():
                    # The residual is stored with every query; per-query warnings would flood a sweep.
                    warnings.simplefilter("ignore", UserWarning)
                    scores = attribute_attention(
                        lm,
                        prompt,
                        fact.object,
                        config.steps,
                        config.rule,
                        config.answer_tokens,
                        max_batch_rows,
                    )
            except DataError as exc:
                raise SkipFact("answer not tokenizable", f"fact {fact.id}: {exc}") from None
            synapses = scores.synapses(config.threshold)
            writer.add(
                "synapses",
                {
                    "fact_id": fact.id,
                    "relation": fact.relation,
                    "method": config.method,
                    "class": kind,
                    "query_index": index,
                    "prompt": prompt,
                    "answer": fact.object,
                    "n_synapses": len(synapses),
                    "synapses": [list(s) + [v] for s, v in synapses],
                    "f_input": float(scores.f_input[0]),
                    "max_residual": float(scores.completeness_residual.max()),
                    "heatmap_neurons": [list(u) for u in columns],
                },
            )
            classes = _neuron_classes(known, index, shape, rng)
            target = query.target_positions[0]
            ids = torch.tensor([list(query.input_ids[: target + 1])], device=lm.device)
            position = torch.tensor([target])
            # The measurements are of the first answer token's prediction; synapses at later
            # (teacher-forced answer) positions of a multi-token answer cannot act on it.
            in_prefix = [s for s, _ in synapses if s[2] <= target]
            measured = {}
            for operation, factor in factors.items():
                chosen = in_prefix if operation != "none" else []
                with (
                    torch.no_grad(),
                    ATTENTION.scale(lm, chosen, factor),  # with no synapse chosen: the probe alone
                    NEURONS.record(lm, positions=position) as acts,
                    peak_memory(lm.device) as memory,
                ):
                    started = time.perf_counter()
                    logits = lm.model(input_ids=ids, logits_to_keep=1).logits
                    if lm.device.type == "cuda":
                        torch.cuda.synchronize(lm.device)
                    seconds = time.perf_counter() - started
                activations = torch.stack([acts[layer][0].cpu() for layer in range(lm.num_layers)]).float()
                prob = float(torch.softmax(logits[0, -1].float(), -1)[query.answer_ids[0]])
                measured[operation] = (activations, prob)
                before, prob_before = measured["none"]
                row = {
                    "fact_id": fact.id,
                    "relation": fact.relation,
                    "method": config.method,
                    "class": kind,
                    "query_index": index,
                    "operation": operation,
                    "n_synapses": len(chosen),
                    "seconds": seconds,
                    "peak_mb": memory["peak_mb"],
                    "memory_measure": memory_measure(lm.device),
                    "prob": prob,
                    "dprob": _relative_change(prob_before, prob) if operation != "none" else 0.0,
                    "heatmap": [float(activations[l, i]) for l, i in columns],
                }
                for name, neurons in classes.items():
                    row[f"n_{name}"] = len(neurons)
                    if neurons:
                        layers, cols = map(list, zip(*neurons))
                        old, new = before[layers, cols], activations[layers, cols]
                        row[f"dkn_{name}"] = _relative_change(float(old.mean()), float(new.mean()))
                        row[f"dkn_{name}_abs"] = _relative_change(
                            float(old.abs().mean()), float(new.abs().mean())
                        )
                    else:
                        row[f"dkn_{name}"] = row[f"dkn_{name}_abs"] = float("nan")
                writer.add("synapse_effects", row)

    return work


# -- tables and figures -----------------------------------------------------------------------

MEASURES = ("signed", "magnitude")
"""How dKN compares activations. ``signed`` (METHODS.md section 7): relative change of the mean
activation. Gated MLPs (Llama, Gemma) have signed activations whose mean over a set of neurons
can be near 0, which makes that ratio explode; ``magnitude`` compares the mean |activation|
instead (the same for GELU neurons that are positive)."""


def effect_columns(measure: str = "signed") -> list[str]:
    if measure not in MEASURES:
        raise QlocError(f"dKN measure {measure!r}: choose {' or '.join(MEASURES)}")
    suffix = "_abs" if measure == "magnitude" else ""
    return [f"dkn_{name}{suffix}" for name in NEURON_CLASSES] + ["dprob"]


def effects_table(effects: pd.DataFrame, measure: str = "signed") -> pd.DataFrame:
    """Figure 6's data: mean (with a bootstrap 95 % interval) and median relative change per
    operation and fact class (and Avg), for the query's KNs, neighbour KNs, random non-KNs (dKN by
    ``measure``) and the answer's probability."""
    columns = effect_columns(measure)
    manipulated = effects[effects["operation"] != "none"]
    parts = []
    for class_name, part in [*manipulated.groupby("class", sort=True), ("Avg", manipulated)]:
        grouped = part.groupby(["method", "operation"], sort=False)
        table = grouped[columns].agg(["mean", "median", _ci_low, _ci_high])
        table.columns = [f"{column}_{stat.removeprefix('_')}" for column, stat in table.columns]
        table["queries"] = grouped.size()
        table["synapses_mean"] = grouped["n_synapses"].mean()
        parts.append(table.assign(**{"class": class_name}).reset_index())
    table = pd.concat(parts, ignore_index=True)
    order = {"suppress": 0, "enhance": 1}
    table = table.sort_values(
        ["method", "operation"], key=lambda c: c.map(order) if c.name == "operation" else c, kind="stable"
    )
    front = ["method", "operation", "class", "queries", "synapses_mean"]
    return table[front + [c for c in table.columns if c not in front]].reset_index(drop=True)


def _ci_low(values: pd.Series) -> float:
    """Lower end of the bootstrap 95 % interval of the mean (a named aggregation for pandas)."""
    return bootstrap_mean_ci(values.replace([np.inf, -np.inf], np.nan))[0]


def _ci_high(values: pd.Series) -> float:
    return bootstrap_mean_ci(values.replace([np.inf, -np.inf], np.nan))[1]


def cost_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Table 6: time and peak memory of one forward pass with none / suppressed / enhanced KS."""
    grouped = effects.groupby(["method", "operation", "memory_measure"], sort=False)
    table = grouped.agg(
        seconds_mean=("seconds", "mean"),
        seconds_median=("seconds", "median"),
        peak_mb_mean=("peak_mb", "mean"),
        peak_mb_max=("peak_mb", "max"),
        passes=("seconds", "size"),
    ).reset_index()
    table["operation"] = pd.Categorical(table["operation"], OPERATIONS, ordered=True)
    return (
        table.sort_values(["method", "operation"])
        .reset_index(drop=True)
        .assign(operation=lambda t: t["operation"].astype(str))
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LABELS = {
    "dkn_kn": "query's KNs",
    "dkn_neighbour": "neighbour KNs",
    "dkn_random": "random non-KNs",
    "dprob": "answer prob.",
}
LABELS.update({f"{k}_abs": f"{v} |a|" for k, v in LABELS.items() if k.startswith("dkn")})


def effects_figure(effects: pd.DataFrame, measure: str = "signed"):
    """Figure 6: mean relative change of KN activations (three neuron classes) and of the answer's
    probability when the query's synapses are suppressed or enhanced, per fact class."""
    plt = _pyplot()
    manipulated = effects[effects["operation"] != "none"]
    operations = [o for o in ("suppress", "enhance") if o in set(manipulated["operation"])]
    classes = sorted(set(manipulated["class"])) + ["Avg"]
    fig, axes = plt.subplots(1, len(operations), figsize=(5.5 * len(operations), 3.8), squeeze=False)
    columns = effect_columns(measure)
    width = 0.8 / len(columns)
    for ax, operation in zip(axes[0], operations):
        part = manipulated[manipulated["operation"] == operation]
        for k, column in enumerate(columns):
            values = [(part if c == "Avg" else part[part["class"] == c])[column].mean() for c in classes]
            ax.bar([i + (k - 1.5) * width for i in range(len(classes))], values, width, label=LABELS[column])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylabel("relative change (mean)")
        ax.set_title(
            f"{operation.capitalize()} knowledge synapses ({', '.join(sorted(set(part['method'])))} KNs)"
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(columns), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def distributions_figure(effects: pd.DataFrame, measure: str = "signed"):
    """Figure 11: distributions over queries of the relative activation change of each neuron
    class, per operation (box plots; the 1st-99th percentile range is shown)."""
    plt = _pyplot()
    manipulated = effects[effects["operation"] != "none"]
    operations = [o for o in ("suppress", "enhance") if o in set(manipulated["operation"])]
    fig, axes = plt.subplots(1, len(operations), figsize=(5 * len(operations), 3.8), squeeze=False)
    columns = effect_columns(measure)[:3]
    for ax, operation in zip(axes[0], operations):
        part = manipulated[manipulated["operation"] == operation]
        data = [part[c].replace([np.inf, -np.inf], np.nan).dropna().to_numpy() for c in columns]
        ax.boxplot([d if len(d) else [np.nan] for d in data], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(columns) + 1), [LABELS[c] for c in columns])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel("relative change of mean activation")
        ax.set_title(f"{operation.capitalize()} KS: dKN per query")
    fig.tight_layout()
    return fig


def heatmap_figure(synapses: pd.DataFrame, effects: pd.DataFrame, fact_id: str):
    """Figures 5 / 10: activations of the fact's KNs (columns, grouped by layer) at each neighbour
    query's target position (rows), without manipulation, with the query's KS suppressed, and
    with them enhanced."""
    plt = _pyplot()
    neurons = synapses[synapses["fact_id"] == fact_id]["heatmap_neurons"].iloc[0]
    fact_effects = effects[effects["fact_id"] == fact_id].sort_values("query_index")
    matrices = {
        op: np.array(fact_effects[fact_effects["operation"] == op]["heatmap"].tolist(), dtype=float)
        for op in OPERATIONS
    }
    if not len(neurons) or matrices["none"].size == 0:
        raise QlocError(f"fact {fact_id} has no KNs to draw")
    limit = float(np.nanmax(np.abs(np.concatenate([m.ravel() for m in matrices.values()])))) or 1.0
    rows = matrices["none"].shape[0]
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(min(20, max(10, 0.06 * len(neurons) * 3 + 3)), 2.2 + 0.25 * rows),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    image = None
    for ax, operation in zip(axes[0], OPERATIONS):
        image = ax.imshow(
            matrices[operation],
            aspect="auto",
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            interpolation="nearest",
        )
        layers = [l for l, _ in neurons]
        starts = [k for k in range(len(layers)) if k == 0 or layers[k] != layers[k - 1]]
        ax.set_xticks(starts, [f"L{layers[k]}" for k in starts], fontsize=6, rotation=90)
        for k in starts[1:]:
            ax.axvline(k - 0.5, color="grey", linewidth=0.4)
        ax.set_title(
            {"none": "no manipulation", "suppress": "KS suppressed", "enhance": "KS enhanced"}[operation],
            fontsize=9,
        )
        ax.set_xlabel("knowledge neuron (by layer)")
    axes[0, 0].set_yticks(range(rows), [f"q{i}" for i in range(rows)], fontsize=7)
    axes[0, 0].set_ylabel("neighbour query")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, pad=0.01, label="activation")
    relation = fact_effects["relation"].iloc[0]
    fig.suptitle(
        f"KN activations of fact {fact_id} ({relation}, {fact_effects['class'].iloc[0]})", fontsize=10
    )
    return fig


def heatmap_facts(effects: pd.DataFrame, count: int) -> list[str]:
    """Facts to draw: alternately KI and KC facts, so that both classes appear, those with the
    most queries first (the clearest picture; ties in run order); no selection by outcome."""
    queries = effects[effects["operation"] == "none"].groupby("fact_id", sort=False)
    eligible = sorted(
        ((fid, g["class"].iloc[0], len(g)) for fid, g in queries if len(g) >= 2), key=lambda f: -f[2]
    )
    eligible = [(fid, kind) for fid, kind, _ in eligible]
    by_class = {c: [fid for fid, k in eligible if k == c] for c in ("KI", "KC")}
    chosen = []
    while len(chosen) < count and any(by_class.values()):
        for c in ("KI", "KC"):
            if by_class[c] and len(chosen) < count:
                chosen.append(by_class[c].pop(0))
    return chosen


def decode_json_columns(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The store keeps lists as JSON text; figures need them as lists."""
    import json

    frame = frame.copy()
    for column in columns:
        frame[column] = [json.loads(v) if isinstance(v, str) else v for v in frame[column]]
    return frame


def write_synapse_report(
    synapses: pd.DataFrame, effects: pd.DataFrame, directory: Path, heatmaps: int = 3
) -> dict[str, Path]:
    """Figure 6's data (for each dKN measure) and Table 6 (CSV + Markdown under ``directory/tables``),
    Figures 6, 11 (each measure) and the heatmaps of Figures 5/10 (PNG + SVG under
    ``directory/figures``) from the stored rows."""
    from ..runs.outputs import save_figure, write_table

    if effects.empty:
        raise QlocError("the synapses run has no stored queries yet")
    synapses = decode_json_columns(synapses, ["heatmap_neurons"])
    effects = decode_json_columns(effects, ["heatmap"])
    tables, figures = directory / "tables", directory / "figures"
    written = {"table6_cost": write_table(cost_table(effects), tables, "table6_cost")}
    for measure in MEASURES:  # METHODS.md's signed means, and the magnitude variant beside them
        suffix = "" if measure == "signed" else f"_{measure}"
        written[f"fig6_synapses{suffix}"] = write_table(
            effects_table(effects, measure), tables, f"fig6_synapses{suffix}"
        )
        written[f"fig6{suffix}"] = save_figure(
            effects_figure(effects, measure), figures, f"fig6_synapses{suffix}"
        )
        written[f"fig11{suffix}"] = save_figure(
            distributions_figure(effects, measure), figures, f"fig11_dkn_distributions{suffix}"
        )
    for k, fact_id in enumerate(heatmap_facts(effects, heatmaps)):
        name = "fig5_heatmap" if k == 0 else f"fig10_heatmap_{k}"
        written[name] = save_figure(heatmap_figure(synapses, effects, fact_id), figures, name)
    return written
