"""KN consistency (METHODS.md section 4; the paper's section 2.1, Table 1, Figures 3, 7, 8, 9).

From the KN sets stored by ``qloc localize``: a consistency score per (fact, method), the KC/KI
classes under a static and an Otsu threshold, Welch's t-test between the classes, Table 1, the
per-relation violin plots and the KI share as the static threshold varies. Everything takes and
returns DataFrames; figures are matplotlib Figures.

Two checks keep Table 1 honest. A static threshold means little without chance: the CS of groups
of queries drawn from *different* facts (:func:`null_consistency`) is what unrelated queries
share, e.g. neurons that fire for the prompt format. And methods that are degenerate on an
architecture (IG's zero baseline under Gemma 2/3's normalised MLP output) are marked and kept out
of U_KI. From dense scores (``localize --save-scores``), :func:`threshold_sensitivity` recomputes
the table under other KN-set rules without attributing again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import QlocError
from ..runs.outputs import check_writable, save_figure, write_table
from ..runs.store import RunStore

if TYPE_CHECKING:
    import torch

STATIC_THRESHOLD = 0.1
SWEEP_THRESHOLDS = np.round(np.arange(0.04, 0.80 + 1e-9, 0.02), 2)
NULL_GROUPS = 2000
"""Groups drawn for the chance distribution of CS, per (model, method)."""
NULL_PERCENTILE = 95
KN_RULES = ("t=0.1", "t=0.2", "t=0.3", "t=0.5", "top10", "top50")
"""KN-set rules of the threshold-sensitivity table: score >= t x max, or the k best neurons."""


def consistency_score(kn_sets: Sequence[Iterable], strict: bool = False) -> float:
    """CS of one fact: relaxed = share of the union held by more than one query's KN set;
    strict = |intersection| / |union|. 0 where the union is empty."""
    sets = [set(map(tuple, s)) for s in kn_sets]
    union = set().union(*sets) if sets else set()
    if not union:
        return 0.0
    if strict:
        return len(set.intersection(*sets)) / len(union)
    counts: dict[tuple, int] = {}
    for s in sets:
        for neuron in s:
            counts[neuron] = counts.get(neuron, 0) + 1
    return sum(1 for c in counts.values() if c > 1) / len(union)


def fact_consistency(kn_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, fact, method): CS relaxed and strict, union size, query count.

    ``kn_frame``: rows of the ``kn_sets`` table (``kn`` as JSON text or lists), with a ``model``
    column where several runs are combined."""
    frame = kn_frame if "model" in kn_frame else kn_frame.assign(model="model")
    rows = []
    for (model, fact_id, relation, method), group in frame.groupby(
        ["model", "fact_id", "relation", "method"], sort=False
    ):
        sets = [json.loads(k) if isinstance(k, str) else k for k in group.sort_values("query_index")["kn"]]
        union = set().union(*(map(tuple, s) for s in sets))
        rows.append(
            {
                "model": model,
                "fact_id": fact_id,
                "relation": relation,
                "method": method,
                "queries": len(sets),
                "union_size": len(union),
                "cs_relaxed": consistency_score(sets),
                "cs_strict": consistency_score(sets, strict=True),
            }
        )
    return pd.DataFrame(rows)


def _query_sets(kn_frame: pd.DataFrame) -> dict[tuple[str, str], list[list[frozenset]]]:
    """Per (model, method), each fact's query KN sets in query order."""
    frame = kn_frame if "model" in kn_frame else kn_frame.assign(model="model")
    runs: dict[tuple[str, str], list[list[frozenset]]] = {}
    for (model, method, _), group in frame.groupby(["model", "method", "fact_id"], sort=False):
        sets = [
            frozenset(map(tuple, json.loads(k) if isinstance(k, str) else k))
            for k in group.sort_values("query_index")["kn"]
        ]
        runs.setdefault((model, method), []).append(sets)
    return runs


def null_consistency(kn_frame: pd.DataFrame, groups: int = NULL_GROUPS, seed: int = 0) -> pd.DataFrame:
    """The chance distribution of CS: per (model, method), ``groups`` groups of queries, each as
    large as one of the run's facts (cycling through them, so sizes follow the run's) and each
    query from a different fact, drawn with a fixed seed. Returns one row per group (model,
    method, size, cs). Groups cannot be larger than the number of facts; a run of one fact has
    no null."""
    rows = []
    for (model, method), facts in _query_sets(kn_frame).items():
        rng = random.Random(f"{seed}:{model}:{method}")
        if len(facts) < 2:
            continue
        for k in range(groups):
            size = min(len(facts[k % len(facts)]), len(facts))
            group = [rng.choice(facts[f]) for f in rng.sample(range(len(facts)), size)]
            rows.append({"model": model, "method": method, "size": size, "cs": consistency_score(group)})
    return pd.DataFrame(rows, columns=["model", "method", "size", "cs"])


def null_summary(null: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method): the null's mean CS, 5th and 95th percentiles."""
    grouped = null.groupby(["model", "method"], sort=False)["cs"]
    return pd.DataFrame(
        {
            "cs_null_mean": grouped.mean(),
            "cs_null_p5": grouped.quantile(0.05),
            f"cs_null_p{NULL_PERCENTILE}": grouped.quantile(NULL_PERCENTILE / 100),
        }
    ).reset_index()


def otsu_threshold(values: Sequence[float], bins: int = 256) -> float:
    """Otsu's threshold on [0, 1]: the histogram cut maximising the between-class variance
    (``bins`` bins; values >= the threshold are the upper class)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan")
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(bins), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(bins), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Every cut inside an empty gap between the classes scores the same: take the middle one.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return float(edges[best[len(best) // 2] + 1])


def classify(
    cs_frame: pd.DataFrame,
    static: float = STATIC_THRESHOLD,
    score: str = "cs_relaxed",
    null: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Adds KC/KI classes under the static threshold and under Otsu's threshold computed per
    (model, method) run, and the Otsu threshold used; with ``null`` (:func:`null_consistency`
    rows), the null's summary and ``above_null``: CS above the null's 95th percentile."""
    frame = cs_frame.copy()
    frame["otsu_threshold"] = frame.groupby(["model", "method"])[score].transform(otsu_threshold)
    frame["class_static"] = np.where(frame[score] >= static, "KC", "KI")
    frame["class_otsu"] = np.where(frame[score] >= frame["otsu_threshold"], "KC", "KI")
    if null is not None:
        frame = frame.merge(null_summary(null), on=["model", "method"], how="left")
        frame["above_null"] = frame[score] > frame[f"cs_null_p{NULL_PERCENTILE}"]
    return frame


def welch(kc: Sequence[float], ki: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of KC against KI (NaN with fewer than 2 of either)."""
    if len(kc) < 2 or len(ki) < 2:
        return float("nan"), float("nan")
    result = stats.ttest_ind(kc, ki, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def table1(classified: pd.DataFrame, score: str = "cs_relaxed") -> pd.DataFrame:
    """Table 1: per (model, method, threshold kind) the KI/KC shares, mean CS per class, Welch's
    t and p, U_KI (share of the model's facts that every non-degenerate method present classes as
    KI; the paper uses all three), how many facts had no KN at all (empty union, CS 0, counted as
    KI), and where the classified frame has them: the chance baseline (mean and 95th percentile of
    the null's CS, share of facts above it) and whether the method is degenerate on the model's
    architecture (``degenerate``; such rows are left out of U_KI)."""
    rows = []
    degenerate = (
        classified["degenerate"] if "degenerate" in classified else pd.Series(False, index=classified.index)
    )
    for kind in ("static", "otsu"):
        column = f"class_{kind}"
        for model, by_model in classified.groupby("model", sort=False):
            sound = by_model[~degenerate.loc[by_model.index].astype(bool)]
            per_fact = sound.pivot_table(
                index="fact_id", columns="method", values=column, aggfunc="first"
            ).dropna()
            u_ki = (
                float((per_fact == "KI").all(axis=1).mean())
                if sound["method"].nunique() > 1 and len(per_fact)
                else float("nan")
            )
            for method, group in by_model.groupby("method", sort=False):
                ki, kc = group[group[column] == "KI"][score], group[group[column] == "KC"][score]
                t, p = welch(kc.tolist(), ki.tolist())
                row = {
                    "model": model,
                    "method": method,
                    "threshold": kind,
                    "threshold_value": STATIC_THRESHOLD
                    if kind == "static"
                    else float(group["otsu_threshold"].iloc[0]),
                    "facts": len(group),
                    "R_KI": len(ki) / len(group),
                    "R_KC": len(kc) / len(group),
                    "CS_KI": float(ki.mean()) if len(ki) else float("nan"),
                    "CS_KC": float(kc.mean()) if len(kc) else float("nan"),
                    "t": t,
                    "p": p,
                    "U_KI": u_ki,
                    "empty_union": int((group["union_size"] == 0).sum()),
                }
                if "above_null" in group:
                    row["cs_null_mean"] = float(group["cs_null_mean"].iloc[0])
                    row[f"cs_null_p{NULL_PERCENTILE}"] = float(group[f"cs_null_p{NULL_PERCENTILE}"].iloc[0])
                    row["R_above_null"] = float(group["above_null"].mean())
                row["degenerate"] = bool(degenerate.loc[group.index].any())
                rows.append(row)
    return pd.DataFrame(rows)


def ki_share_curve(
    cs_frame: pd.DataFrame, thresholds: Sequence[float] = SWEEP_THRESHOLDS, score: str = "cs_relaxed"
) -> pd.DataFrame:
    """Figure 9's data: share of KI facts per (model, method) as the static threshold runs."""
    rows = []
    for (model, method), group in cs_frame.groupby(["model", "method"], sort=False):
        values = group[score].to_numpy()
        for threshold in thresholds:
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "threshold": float(threshold),
                    "ki_share": float((values < threshold).mean()),
                }
            )
    return pd.DataFrame(rows)


def relation_order(relations: Iterable[str]) -> list[str]:
    """Relations in numeric order of their Wikidata id (P17 before P101)."""
    return sorted(set(relations), key=lambda r: (int(r[1:]) if r[1:].isdigit() else 10**9, r))


def relation_summary(cs_frame: pd.DataFrame, method: str, score: str = "cs_relaxed") -> pd.DataFrame:
    """The data behind a violin plot: per (model, relation) the facts, mean, median and KI share."""
    data = cs_frame[cs_frame["method"] == method]
    summary = data.groupby(["model", "relation"], sort=False)[score].agg(
        facts="size", mean="mean", median="median", ki_share=lambda v: float((v < STATIC_THRESHOLD).mean())
    )
    summary = summary.reset_index()
    summary["order"] = summary["relation"].map(
        {r: i for i, r in enumerate(relation_order(summary["relation"]))}
    )
    return summary.sort_values(["model", "order"]).drop(columns="order").reset_index(drop=True)


def violin_figure(
    cs_frame: pd.DataFrame, method: str, score: str = "cs_relaxed", null: pd.DataFrame | None = None
):
    """Figures 3/7/8: CS per relation for one method (one panel per model); with ``null``
    (:func:`null_consistency` rows), the chance band (5th-95th percentile, mean) behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = cs_frame[cs_frame["method"] == method]
    models = list(data["model"].unique())
    relations = relation_order(data["relation"])
    chance = null_summary(null).set_index(["model", "method"]) if null is not None and len(null) else None
    fig, axes = plt.subplots(
        len(models), 1, figsize=(max(8, 0.45 * len(relations)), 3.2 * len(models)), squeeze=False
    )
    for ax, model in zip(axes[:, 0], models):
        panel = data[data["model"] == model]
        if chance is not None and (model, method) in chance.index:
            band = chance.loc[(model, method)]
            ax.axhspan(
                band["cs_null_p5"],
                band[f"cs_null_p{NULL_PERCENTILE}"],
                color="#bbbbbb",
                alpha=0.35,
                linewidth=0,
                label=f"chance: CS of queries from different facts (5-{NULL_PERCENTILE}th pct.)",
            )
            ax.axhline(band["cs_null_mean"], color="#777777", linewidth=0.8)
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


def threshold_figure(curve: pd.DataFrame):
    """Figure 9: KI share against the static threshold, one line per model and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def model_label(model: str) -> str:
    """Paths are shown by their last part."""
    return Path(model).name if "/" in model or model.endswith(".gguf") else model


def _degenerate_methods(store: RunStore) -> set[str]:
    """Methods degenerate on the architecture of the run's model (from its stored environment)."""
    from ..engine.architectures import architecture_for
    from ..engine.attribution import METHODS
    from ..errors import UnsupportedArchitectureError

    localize = next((stage for stage in store.stages() if stage["stage"] == "localize"), None)
    model_type = ((localize or {}).get("environment") or {}).get("model", {}).get("model_type")
    if model_type is None:
        return set()
    try:
        arch = architecture_for(model_type)
    except UnsupportedArchitectureError:
        return set()
    return {name for name, method in METHODS.items() if method.degenerate_on(arch)}


def load_kn_sets(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """The ``kn_sets`` tables of several runs, with a ``model`` column from each run's parameters
    and ``degenerate`` marking methods that are degenerate on that model's architecture."""
    frames = []
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            model = model_label(store.params("localize")["model"])
            degenerate = _degenerate_methods(store)
            frame = store.frame("kn_sets")
            frames.append(
                frame.assign(model=model, run_dir=str(run_dir), degenerate=frame["method"].isin(degenerate))
            )
    combined = pd.concat(frames, ignore_index=True)
    duplicated = combined.duplicated(["model", "method", "fact_id", "query_index"])
    if duplicated.any():
        row = combined[duplicated].iloc[0]
        raise QlocError(
            f"runs {sorted(set(combined.run_dir))} both hold {row.method} KN sets of {row.model} fact "
            f"{row.fact_id}; give each (model, method) once"
        )
    return combined


def _rule_kn_set(scores: torch.Tensor, rule: str) -> list[tuple[int, int]]:
    from ..engine.attribution import kn_set

    if rule.startswith("top"):
        return kn_set(scores, top_k_neurons=int(rule.removeprefix("top")))
    return kn_set(scores, float(rule.removeprefix("t=")))


def dense_kn_sets(run_dirs: Sequence[str | Path], rules: Sequence[str] = KN_RULES) -> pd.DataFrame:
    """KN sets recomputed under each rule from the dense scores that ``localize --save-scores``
    stored (fp16: a neuron within fp16 rounding of the cut can fall on the other side than in the
    fp32 sets of ``kn_sets``). Columns as :func:`load_kn_sets`, plus ``kn_rule``; empty where no run
    kept dense scores."""
    import torch

    from .localize import load_dense_scores

    rows = []
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            if "dense_scores" not in store.tables():
                continue
            model = model_label(store.params("localize")["model"])
            degenerate = _degenerate_methods(store)
            relation = store.frame("kn_sets").drop_duplicates("fact_id").set_index("fact_id")["relation"]
            for row in store.frame("dense_scores").itertuples():
                scores = torch.from_numpy(load_dense_scores(row.scores_npz).astype(np.float32))
                for rule in rules:
                    kn = _rule_kn_set(scores, rule)
                    rows.append(
                        {
                            "model": model,
                            "fact_id": row.fact_id,
                            "relation": relation[row.fact_id],
                            "method": row.method,
                            "query_index": row.query_index,
                            "kn": kn,
                            "kn_size": len(kn),
                            "kn_rule": rule,
                            "degenerate": row.method in degenerate,
                        }
                    )
    return pd.DataFrame(rows)


def threshold_sensitivity(dense: pd.DataFrame, score: str = "cs_relaxed") -> pd.DataFrame:
    """Table 1's key numbers under each KN-set rule (rows of :func:`dense_kn_sets`): per (model,
    method, rule) the KI share under the static and the Otsu threshold, mean CS of KC and KI facts
    (static), the chance baseline and the share of facts above it, and the mean KN-set size."""
    rows = []
    for rule, frame in dense.groupby("kn_rule", sort=False):
        classified = classify(fact_consistency(frame), score=score, null=null_consistency(frame))
        sizes = frame.groupby(["model", "method"])["kn_size"].mean()
        degenerate = frame.groupby(["model", "method"])["degenerate"].any()
        for (model, method), group in classified.groupby(["model", "method"], sort=False):
            static_ki = group["class_static"] == "KI"
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "kn_rule": rule,
                    "facts": len(group),
                    "mean_kn_size": float(sizes[(model, method)]),
                    "R_KI_static": float(static_ki.mean()),
                    "R_KI_otsu": float((group["class_otsu"] == "KI").mean()),
                    "otsu_threshold": float(group["otsu_threshold"].iloc[0]),
                    "CS_KC": float(group.loc[~static_ki, score].mean())
                    if (~static_ki).any()
                    else float("nan"),
                    "CS_KI": float(group.loc[static_ki, score].mean()) if static_ki.any() else float("nan"),
                    "cs_mean": float(group[score].mean()),
                    "cs_null_mean": float(group["cs_null_mean"].iloc[0])
                    if "cs_null_mean" in group
                    else float("nan"),
                    "R_above_null": float(group["above_null"].mean())
                    if "above_null" in group
                    else float("nan"),
                    "degenerate": bool(degenerate[(model, method)]),
                }
            )
    table = pd.DataFrame(rows)
    table["rule_order"] = table["kn_rule"].map({r: i for i, r in enumerate(KN_RULES)})
    return (
        table.sort_values(["model", "method", "rule_order"]).drop(columns="rule_order").reset_index(drop=True)
    )


def sensitivity_figure(table: pd.DataFrame):
    """KI share (static and Otsu) and mean CS against chance, per KN-set rule: does the conclusion
    depend on how many neurons a KN set holds?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = [r for r in KN_RULES if r in set(table["kn_rule"])]
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


@dataclass
class ConsistencyStudy:
    """Everything Table 1 and Figures 3/7/8/9 are made of, for one or more localize runs."""

    classified: pd.DataFrame
    """Per (model, fact, method): CS, classes, the null's summary, ``above_null``, ``degenerate``."""
    null: pd.DataFrame
    table1: pd.DataFrame
    curve: pd.DataFrame
    score: str

    @property
    def methods(self) -> list[str]:
        return list(self.classified["method"].unique())

    def relations(self, method: str) -> pd.DataFrame:
        return relation_summary(self.classified, method, self.score)

    def violin(self, method: str):
        return violin_figure(self.classified, method, self.score, self.null)

    def threshold_figure(self):
        return threshold_figure(self.curve)

    def per_fact(self) -> pd.DataFrame:
        columns = [
            "model",
            "fact_id",
            "relation",
            "method",
            "queries",
            "union_size",
            "cs_relaxed",
            "cs_strict",
            "otsu_threshold",
            "class_static",
            "class_otsu",
            "above_null",
            "degenerate",
        ]
        return self.classified[[c for c in columns if c in self.classified]]


def consistency_study(kn_frame: pd.DataFrame, score: str = "cs_relaxed") -> ConsistencyStudy:
    """KN consistency of the rows of :func:`load_kn_sets`: per-fact CS and classes with the chance
    baseline, Table 1 (degenerate methods marked) and Figure 9's curve."""
    null = null_consistency(kn_frame)
    classified = classify(fact_consistency(kn_frame), score=score, null=null)
    if "degenerate" in kn_frame:
        degenerate = kn_frame.drop_duplicates(["model", "method"]).set_index(["model", "method"])[
            "degenerate"
        ]
        classified["degenerate"] = [
            bool(degenerate[key]) for key in zip(classified["model"], classified["method"])
        ]
    return ConsistencyStudy(
        classified, null, table1(classified, score), ki_share_curve(classified, score=score), score
    )


def write_consistency_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, score: str = "cs_relaxed"
) -> dict[str, Path]:
    """Table 1 with its chance baseline, per-fact scores and Figures 3/7/8/9 under ``out_dir``/tables
    and /figures; the threshold-sensitivity table and figure where the runs kept dense scores."""
    out_dir = Path(out_dir)
    tables, figures = out_dir / "tables", out_dir / "figures"
    check_writable(out_dir, "tables and figures")
    study = consistency_study(load_kn_sets(run_dirs), score)
    tables.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot be read leaves no folder
    written: dict[str, Path] = {}
    study.per_fact().to_csv(tables / "consistency.csv", index=False)
    written["consistency"] = tables / "consistency.csv"
    written["table1"] = write_table(study.table1, tables, "table1")
    if len(study.null):
        written["null"] = write_table(null_summary(study.null), tables, "cs_null")
    study.curve.to_csv(tables / "fig9_ki_share.csv", index=False)
    for method in study.methods:
        study.relations(method).to_csv(tables / f"relations_{method}.csv", index=False)
        written[f"violin_{method}"] = save_figure(study.violin(method), figures, f"violin_{method}")
    written["fig9"] = save_figure(study.threshold_figure(), figures, "fig9_threshold")
    dense = dense_kn_sets(run_dirs)
    if len(dense):
        sensitivity = threshold_sensitivity(dense, score)
        written["threshold_sensitivity"] = write_table(sensitivity, tables, "threshold_sensitivity")
        written["threshold_sensitivity_fig"] = save_figure(
            sensitivity_figure(sensitivity), figures, "threshold_sensitivity"
        )
    return written
