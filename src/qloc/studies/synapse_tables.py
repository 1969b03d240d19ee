"""The knowledge-synapse study's tables and figures, from its stored rows: Figure 6's data and
figure (relative changes of KN activations and of the answer's probability), Figure 11 (their
distributions), Table 6 (cost), and the KN-activation heatmaps of Figures 5/10."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import QlocError
from ..runs.outputs import pyplot, save_figure, write_table
from .statistics import bootstrap_mean_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OPERATIONS = ("none", "suppress", "enhance")
NEURON_CLASSES = ("kn", "neighbour", "random")
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


LABELS = {
    "dkn_kn": "query's KNs",
    "dkn_neighbour": "neighbour KNs",
    "dkn_random": "random non-KNs",
    "dprob": "answer prob.",
}
LABELS.update({f"{k}_abs": f"{v} |a|" for k, v in LABELS.items() if k.startswith("dkn")})


def effects_figure(effects: pd.DataFrame, measure: str = "signed") -> Figure:
    """Figure 6: mean relative change of KN activations (three neuron classes) and of the answer's
    probability when the query's synapses are suppressed or enhanced, per fact class."""
    plt = pyplot()
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


def distributions_figure(effects: pd.DataFrame, measure: str = "signed") -> Figure:
    """Figure 11: distributions over queries of the relative activation change of each neuron
    class, per operation (box plots; the 1st-99th percentile range is shown)."""
    plt = pyplot()
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


def heatmap_figure(synapses: pd.DataFrame, effects: pd.DataFrame, fact_id: str) -> Figure:
    """Figures 5 / 10: activations of the fact's KNs (columns, grouped by layer) at each neighbour
    query's target position (rows), without manipulation, with the query's KS suppressed, and
    with them enhanced."""
    plt = pyplot()
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
        layers = [layer for layer, _ in neurons]
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
    sized = sorted(
        ((fid, g["class"].iloc[0], len(g)) for fid, g in queries if len(g) >= 2), key=lambda f: -f[2]
    )
    by_class = {c: [fid for fid, k, _ in sized if k == c] for c in ("KI", "KC")}
    chosen: list[str] = []
    while len(chosen) < count and any(by_class.values()):
        for c in ("KI", "KC"):
            if by_class[c] and len(chosen) < count:
                chosen.append(by_class[c].pop(0))
    return chosen


def write_synapse_report(
    synapses: pd.DataFrame, effects: pd.DataFrame, directory: Path, heatmaps: int = 3
) -> dict[str, Path]:
    """Figure 6's data (for each dKN measure) and Table 6 (CSV + Markdown under ``directory/tables``),
    Figures 6, 11 (each measure) and the heatmaps of Figures 5/10 (PNG + SVG under
    ``directory/figures``) from the stored rows, as their row classes read them (lists, not JSON)."""
    if effects.empty:
        raise QlocError("the synapses run has no stored queries yet")
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
