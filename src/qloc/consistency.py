"""KN consistency (METHODS.md section 4; the paper's section 2.1, Table 1, Figures 3, 7, 8, 9).

From the KN sets stored by ``qloc localize``: a consistency score per (fact, method), the KC/KI
classes under a static and an Otsu threshold, Welch's t-test between the classes, Table 1, the
per-relation violin plots and the KI share as the static threshold varies. Everything takes and
returns DataFrames; figures are matplotlib Figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import QlocError
from .outputs import check_writable, save_figure, write_table
from .store import RunStore

STATIC_THRESHOLD = 0.1
SWEEP_THRESHOLDS = np.round(np.arange(0.04, 0.80 + 1e-9, 0.02), 2)


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
    for (model, fact_id, relation, method), group in frame.groupby(["model", "fact_id", "relation", "method"], sort=False):
        sets = [json.loads(k) if isinstance(k, str) else k for k in group.sort_values("query_index")["kn"]]
        union = set().union(*(map(tuple, s) for s in sets))
        rows.append({
            "model": model, "fact_id": fact_id, "relation": relation, "method": method,
            "queries": len(sets), "union_size": len(union),
            "cs_relaxed": consistency_score(sets), "cs_strict": consistency_score(sets, strict=True),
        })
    return pd.DataFrame(rows)


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


def classify(cs_frame: pd.DataFrame, static: float = STATIC_THRESHOLD, score: str = "cs_relaxed") -> pd.DataFrame:
    """Adds KC/KI classes under the static threshold and under Otsu's threshold computed per
    (model, method) run, and the Otsu threshold used."""
    frame = cs_frame.copy()
    frame["otsu_threshold"] = frame.groupby(["model", "method"])[score].transform(otsu_threshold)
    frame["class_static"] = np.where(frame[score] >= static, "KC", "KI")
    frame["class_otsu"] = np.where(frame[score] >= frame["otsu_threshold"], "KC", "KI")
    return frame


def welch(kc: Sequence[float], ki: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of KC against KI (NaN with fewer than 2 of either)."""
    if len(kc) < 2 or len(ki) < 2:
        return float("nan"), float("nan")
    result = stats.ttest_ind(kc, ki, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def table1(classified: pd.DataFrame, score: str = "cs_relaxed") -> pd.DataFrame:
    """Table 1: per (model, method, threshold kind) the KI/KC shares, mean CS per class, Welch's
    t and p, U_KI (share of the model's facts that every method present classes as KI; the paper
    uses all three), and how many facts had no KN at all (empty union, CS 0, counted as KI)."""
    rows = []
    for kind in ("static", "otsu"):
        column = f"class_{kind}"
        for model, by_model in classified.groupby("model", sort=False):
            methods = by_model["method"].unique()
            per_fact = by_model.pivot_table(index="fact_id", columns="method", values=column, aggfunc="first").dropna()
            u_ki = float((per_fact == "KI").all(axis=1).mean()) if len(methods) > 1 and len(per_fact) else float("nan")
            for method, group in by_model.groupby("method", sort=False):
                ki, kc = group[group[column] == "KI"][score], group[group[column] == "KC"][score]
                t, p = welch(kc.tolist(), ki.tolist())
                rows.append({
                    "model": model, "method": method, "threshold": kind,
                    "threshold_value": STATIC_THRESHOLD if kind == "static" else float(group["otsu_threshold"].iloc[0]),
                    "facts": len(group), "R_KI": len(ki) / len(group), "R_KC": len(kc) / len(group),
                    "CS_KI": float(ki.mean()) if len(ki) else float("nan"),
                    "CS_KC": float(kc.mean()) if len(kc) else float("nan"),
                    "t": t, "p": p, "U_KI": u_ki, "empty_union": int((group["union_size"] == 0).sum()),
                })
    return pd.DataFrame(rows)


def ki_share_curve(cs_frame: pd.DataFrame, thresholds: Sequence[float] = SWEEP_THRESHOLDS, score: str = "cs_relaxed") -> pd.DataFrame:
    """Figure 9's data: share of KI facts per (model, method) as the static threshold runs."""
    rows = []
    for (model, method), group in cs_frame.groupby(["model", "method"], sort=False):
        values = group[score].to_numpy()
        for threshold in thresholds:
            rows.append({"model": model, "method": method, "threshold": float(threshold),
                         "ki_share": float((values < threshold).mean())})
    return pd.DataFrame(rows)


def relation_order(relations: Iterable[str]) -> list[str]:
    """Relations in numeric order of their Wikidata id (P17 before P101)."""
    return sorted(set(relations), key=lambda r: (int(r[1:]) if r[1:].isdigit() else 10**9, r))


def relation_summary(cs_frame: pd.DataFrame, method: str, score: str = "cs_relaxed") -> pd.DataFrame:
    """The data behind a violin plot: per (model, relation) the facts, mean, median and KI share."""
    data = cs_frame[cs_frame["method"] == method]
    summary = data.groupby(["model", "relation"], sort=False)[score].agg(
        facts="size", mean="mean", median="median", ki_share=lambda v: float((v < STATIC_THRESHOLD).mean()))
    summary = summary.reset_index()
    summary["order"] = summary["relation"].map({r: i for i, r in enumerate(relation_order(summary["relation"]))})
    return summary.sort_values(["model", "order"]).drop(columns="order").reset_index(drop=True)


def violin_figure(cs_frame: pd.DataFrame, method: str, score: str = "cs_relaxed"):
    """Figures 3/7/8: CS per relation for one method (one panel per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = cs_frame[cs_frame["method"] == method]
    models = list(data["model"].unique())
    relations = relation_order(data["relation"])
    fig, axes = plt.subplots(len(models), 1, figsize=(max(8, 0.45 * len(relations)), 3.2 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        panel = data[data["model"] == model]
        sns.violinplot(data=panel, x="relation", y=score, order=relations, ax=ax,
                       cut=0, density_norm="width", inner=None, color="#8fb8de", linewidth=0.8)
        # Facts as dots too: a sampled run has few facts per relation, where a violin alone says little.
        sns.stripplot(data=panel, x="relation", y=score, order=relations, ax=ax, color="#1f3b57", size=3, jitter=0.15)
        ax.axhline(STATIC_THRESHOLD, color="#c0392b", linestyle="--", linewidth=1, label=f"static threshold {STATIC_THRESHOLD}")
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
        ax.plot(group["threshold"], group["ki_share"], marker="o", markersize=2.5, label=f"{model} {method.upper()}")
    ax.axvline(STATIC_THRESHOLD, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("static threshold")
    ax.set_ylabel("share of KI facts")
    ax.set_ylim(0, 1.02)
    ax.set_title("Inconsistent knowledge as the threshold varies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def load_kn_sets(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """The ``kn_sets`` tables of several runs, with a ``model`` column from each run's parameters."""
    frames = []
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            model = store.params("localize")["model"]
            model = Path(model).name if "/" in model or model.endswith(".gguf") else model  # paths: their last part
            frames.append(store.frame("kn_sets").assign(model=model, run_dir=str(run_dir)))
    combined = pd.concat(frames, ignore_index=True)
    duplicated = combined.duplicated(["model", "method", "fact_id", "query_index"])
    if duplicated.any():
        row = combined[duplicated].iloc[0]
        raise QlocError(f"runs {sorted(set(combined.run_dir))} both hold {row.method} KN sets of {row.model} fact "
                        f"{row.fact_id}; give each (model, method) once")
    return combined


def write_consistency_report(run_dirs: Sequence[str | Path], out_dir: str | Path, score: str = "cs_relaxed") -> dict[str, Path]:
    """Table 1, per-fact scores and Figures 3/7/8/9 under ``out_dir``/tables and /figures."""
    out_dir = Path(out_dir)
    tables, figures = out_dir / "tables", out_dir / "figures"
    check_writable(out_dir, "tables and figures")
    classified = classify(fact_consistency(load_kn_sets(run_dirs)), score=score)
    tables.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot be read leaves no folder
    written: dict[str, Path] = {}
    columns = ["model", "fact_id", "relation", "method", "queries", "union_size", "cs_relaxed", "cs_strict",
               "otsu_threshold", "class_static", "class_otsu"]
    classified[columns].to_csv(tables / "consistency.csv", index=False)
    written["consistency"] = tables / "consistency.csv"
    written["table1"] = write_table(table1(classified, score), tables, "table1")
    curve = ki_share_curve(classified, score=score)
    curve.to_csv(tables / "fig9_ki_share.csv", index=False)
    for method in classified["method"].unique():
        relation_summary(classified, method, score).to_csv(tables / f"relations_{method}.csv", index=False)
        written[f"violin_{method}"] = save_figure(violin_figure(classified, method, score), figures, f"violin_{method}")
    written["fig9"] = save_figure(threshold_figure(curve), figures, "fig9_threshold")
    return written
