"""Table 1's numbers from KN sets (METHODS.md section 4): a consistency score per (fact, method),
the KC/KI classes under a static and an Otsu threshold, Welch's t-test between the classes, the
chance baseline, Table 1, Figure 9's curve, the per-relation summaries and the KN-rule
sensitivity. Everything takes and returns DataFrames; :mod:`qloc.studies.consistency` is the study
that writes them.

Two checks keep Table 1 honest. A static threshold means little without chance: the CS of groups
of queries drawn from *different* facts (:func:`null_consistency`) is what unrelated queries
share, e.g. neurons that fire for the prompt format. And methods that are degenerate on an
architecture (IG's zero baseline under Gemma 2/3's normalised MLP output) are marked and kept out
of U_KI. From dense scores (``localize --save-scores``), :func:`threshold_sensitivity` recomputes
the table under other KN-set rules without attributing again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data.pararel import relation_order
from .knsets import KN_RULES, STATIC_THRESHOLD, consistency_score
from .statistics import otsu_threshold, welch

SWEEP_THRESHOLDS = np.round(np.arange(0.04, 0.80 + 1e-9, 0.02), 2)
NULL_GROUPS = 2000
"""Groups drawn for the chance distribution of CS, per (model, method)."""
NULL_PERCENTILE = 95
PER_FACT_COLUMNS = (
    "model fact_id relation method queries union_size cs_relaxed cs_strict otsu_threshold class_static "
    "class_otsu above_null degenerate"
).split()


def _query_kn(group: pd.DataFrame) -> list[Any]:
    """A fact's query KN sets in query order; JSON text (a table read by name) is refused rather
    than read as characters."""
    sets = list(group.sort_values("query_index")["kn"])
    if any(isinstance(s, str) for s in sets):
        raise TypeError("kn holds JSON text: read the table with RunStore.frame(KnSetRow)")
    return sets


def fact_consistency(kn_frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, fact, method): CS relaxed, majority (a KN in more than half of the
    queries' sets) and strict, union size, query count.

    ``kn_frame``: rows of the ``kn_sets`` table (``kn`` as lists, as ``RunStore.frame(KnSetRow)``
    reads it), with a ``model`` column where several runs are combined."""
    frame = kn_frame if "model" in kn_frame else kn_frame.assign(model="model")
    rows = []
    for (model, fact_id, relation, method), group in frame.groupby(
        ["model", "fact_id", "relation", "method"], sort=False
    ):
        sets = _query_kn(group)
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
                "cs_majority": consistency_score(sets, min_count=len(sets) // 2 + 1),
                "cs_strict": consistency_score(sets, strict=True),
            }
        )
    return pd.DataFrame(rows)


def _query_sets(kn_frame: pd.DataFrame) -> dict[tuple[str, str], list[list[frozenset]]]:
    """Per (model, method), each fact's query KN sets in query order."""
    frame = kn_frame if "model" in kn_frame else kn_frame.assign(model="model")
    runs: dict[tuple[str, str], list[list[frozenset]]] = {}
    for (model, method, _), group in frame.groupby(["model", "method", "fact_id"], sort=False):
        sets = [frozenset(map(tuple, k)) for k in _query_kn(group)]
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
    return pd.DataFrame(rows, columns=["model", "method", "size", "cs"]).astype({"size": int, "cs": float})


NO_NULL = "none: each query of a chance group comes from another fact, and the run has 1 fact"
"""Table 1's ``chance`` where a (model, method) has no null (:func:`null_consistency`)."""


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
        chance = frame[f"cs_null_p{NULL_PERCENTILE}"]
        frame["above_null"] = (frame[score] > chance).where(chance.notna())  # NaN: no null to beat
    return frame


def table1(classified: pd.DataFrame, score: str = "cs_relaxed") -> pd.DataFrame:
    """Table 1: per (model, method, threshold) the KI/KC shares, mean CS per class, Welch's
    t and p, U_KI (share of the model's facts that every non-degenerate method present classes as
    KI; the paper uses all three), how many facts had no KN at all (empty union, CS 0, counted as
    KI), and where the classified frame has them: the chance baseline (mean and 95th percentile of
    the null's CS, share of facts above it) and whether the method is degenerate on the model's
    architecture (``degenerate``; such rows are left out of U_KI)."""
    rows = []
    degenerate = (
        classified["degenerate"] if "degenerate" in classified else pd.Series(False, index=classified.index)
    )
    for threshold in ("static", "otsu"):
        column = f"class_{threshold}"
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
                    "threshold": threshold,
                    "threshold_value": STATIC_THRESHOLD
                    if threshold == "static"
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
                    if math.isnan(row["cs_null_mean"]):
                        row["chance"] = NO_NULL
                row["degenerate"] = bool(degenerate.loc[group.index].any())
                rows.append(row)
    return pd.DataFrame(rows)


def ki_share_curve(
    cs_frame: pd.DataFrame,
    thresholds: Sequence[float] | np.ndarray = SWEEP_THRESHOLDS,
    score: str = "cs_relaxed",
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
