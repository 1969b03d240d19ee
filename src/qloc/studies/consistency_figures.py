"""The figures of the KN-consistency study: CS per relation (Figures 3/7/8), the KI share as the
static threshold varies (Figure 9), and Table 1's numbers per KN-set rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..data.pararel import relation_order
from ..runs.outputs import pyplot
from .knsets import STATIC_THRESHOLD

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def violin_figure(
    cs_frame: pd.DataFrame, method: str, score: str = "cs_relaxed", chance: pd.DataFrame | None = None
) -> Figure:
    """Figures 3/7/8: CS per relation for one method (one panel per model); with ``chance`` (per
    model and method: ``low``, ``high`` and ``mean`` CS of the chance baseline, and its ``label``),
    the chance band behind it."""
    import seaborn as sns

    plt = pyplot()
    data = cs_frame[cs_frame["method"] == method]
    models = list(data["model"].unique())
    relations = relation_order(data["relation"])
    bands = chance.set_index(["model", "method"]) if chance is not None and len(chance) else None
    fig, axes = plt.subplots(
        len(models), 1, figsize=(max(8, 0.45 * len(relations)), 3.2 * len(models)), squeeze=False
    )
    for ax, model in zip(axes[:, 0], models):
        panel = data[data["model"] == model]
        if bands is not None and (model, method) in bands.index:
            band = bands.loc[(model, method)]
            ax.axhspan(
                band["low"], band["high"], color="#bbbbbb", alpha=0.35, linewidth=0, label=band["label"]
            )
            ax.axhline(band["mean"], color="#777777", linewidth=0.8)
        sns.violinplot(
            data=panel,
            x="relation",
            y=score,
            order=relations,
            ax=ax,
            cut=0,
            density_norm="width",
            inner=None,
            color="#8fb8de",
            linewidth=0.8,
        )
        # Facts as dots too: a sampled run has few facts per relation, where a violin alone says little.
        sns.stripplot(
            data=panel, x="relation", y=score, order=relations, ax=ax, color="#1f3b57", size=3, jitter=0.15
        )
        ax.axhline(
            STATIC_THRESHOLD,
            color="#c0392b",
            linestyle="--",
            linewidth=1,
            label=f"static threshold {STATIC_THRESHOLD}",
        )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{model}: KN consistency per relation ({method.upper()})")
        ax.set_xlabel("relation")
        ax.set_ylabel("CS" if score == "cs_relaxed" else "CS (strict)")
        ax.tick_params(axis="x", rotation=90)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def threshold_figure(curve: pd.DataFrame) -> Figure:
    """Figure 9: KI share against the static threshold, one line per model and method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (model, method), group in curve.groupby(["model", "method"], sort=False):
        ax.plot(
            group["threshold"],
            group["ki_share"],
            marker="o",
            markersize=2.5,
            label=f"{model} {method.upper()}",
        )
    ax.axvline(STATIC_THRESHOLD, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("static threshold")
    ax.set_ylabel("share of KI facts")
    ax.set_ylim(0, 1.02)
    ax.set_title("Inconsistent knowledge as the threshold varies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sensitivity_figure(table: pd.DataFrame) -> Figure:
    """KI share (static and Otsu) and mean CS against chance, per KN-set rule (in the table's order):
    does the conclusion depend on how many neurons a KN set holds?"""
    plt = pyplot()
    rules = list(dict.fromkeys(table["kn_rule"]))
    x = np.arange(len(rules))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (model, method), group in table.groupby(["model", "method"], sort=False):
        group = group.set_index("kn_rule").reindex(rules)
        label = f"{model} {method.upper()}" + (" (degenerate)" if group["degenerate"].any() else "")
        line = axes[0].plot(x, group["R_KI_static"], marker="o", label=label)[0]
        axes[0].plot(x, group["R_KI_otsu"], marker="s", linestyle=":", color=line.get_color())
        axes[1].plot(x, group["cs_mean"], marker="o", color=line.get_color(), label=label)
        axes[1].plot(x, group["cs_null_mean"], linestyle="--", color=line.get_color(), alpha=0.7)
    axes[0].set_ylabel("share of KI facts (solid: static 0.1; dotted: Otsu)")
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylabel("mean CS (solid) and chance CS (dashed)")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xticks(x, rules)
        ax.set_xlabel("KN-set rule")
    axes[0].legend(fontsize=7)
    fig.suptitle("How the KN-consistency conclusion depends on the KN-set rule")
    fig.tight_layout()
    return fig
