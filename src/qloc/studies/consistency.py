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
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..data.pararel import relation_order
from ..runs.outputs import check_writable, save_figure, write_csv, write_table
from ..settings import setting
from .consistency_figures import sensitivity_figure, threshold_figure, violin_figure
from .knsets import KN_RULES, STATIC_THRESHOLD, consistency_score, dense_kn_sets, load_kn_sets
from .registry import Outcome, Panel, Reproduction, Study
from .statistics import otsu_threshold, welch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SWEEP_THRESHOLDS = np.round(np.arange(0.04, 0.80 + 1e-9, 0.02), 2)
NULL_GROUPS = 2000
"""Groups drawn for the chance distribution of CS, per (model, method)."""
NULL_PERCENTILE = 95
PER_FACT_COLUMNS = (
    "model fact_id relation method queries union_size cs_relaxed cs_strict otsu_threshold class_static "
    "class_otsu above_null degenerate"
).split()


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

    def violin(self, method: str) -> Figure:
        chance = None
        if len(self.null):
            chance = null_summary(self.null).rename(
                columns={"cs_null_p5": "low", f"cs_null_p{NULL_PERCENTILE}": "high", "cs_null_mean": "mean"}
            )
            chance["label"] = f"chance: CS of queries from different facts (5-{NULL_PERCENTILE}th pct.)"
        return violin_figure(self.classified, method, self.score, chance)

    def threshold_figure(self) -> Figure:
        return threshold_figure(self.curve)

    def per_fact(self) -> pd.DataFrame:
        """``tables/consistency.csv``: per fact and method, CS, its classes, and whether it beats chance."""
        return self.classified[[c for c in PER_FACT_COLUMNS if c in self.classified]]


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


CONSISTENCY_OUTPUTS = ("table1", "cs_null", "consistency", "fig9_ki_share", "fig9_threshold")
CONSISTENCY_OUTPUT_PREFIXES = ("relations_", "violin_", "threshold_sensitivity")
"""The names of the tables and figures :func:`write_consistency_report` writes (some per method)."""


def written_by_consistency(name: str) -> bool:
    """Whether a table or figure of this name is one of ``qloc consistency``'s."""
    return name in CONSISTENCY_OUTPUTS or name.startswith(CONSISTENCY_OUTPUT_PREFIXES)


def write_consistency_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    score: str = "cs_relaxed",
    all_tokens_run: Path | None = None,
) -> dict[str, Path]:
    """Table 1 with its chance baseline, per-fact scores, Figures 3/7/8/9, the strata and ablation of
    :mod:`qloc.studies.consistency_strata` under ``out_dir``/tables and /figures; the threshold
    sensitivity where the runs kept dense scores."""
    from .consistency_strata import write_strata_tables  # it builds on this module's CS functions

    out_dir = Path(out_dir)
    tables, figures = out_dir / "tables", out_dir / "figures"
    check_writable(out_dir, "tables and figures")
    kn_frame = load_kn_sets(run_dirs)
    study = consistency_study(kn_frame, score)
    tables.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot be read leaves no folder
    written: dict[str, Path] = {}
    written["consistency"] = write_csv(study.per_fact(), tables / "consistency.csv")
    written["table1"] = write_table(study.table1, tables, "table1")
    if len(study.null):
        written["null"] = write_table(null_summary(study.null), tables, "cs_null")
    write_csv(study.curve, tables / "fig9_ki_share.csv")
    for method in study.methods:
        write_csv(study.relations(method), tables / f"relations_{method}.csv")
        written[f"violin_{method}"] = save_figure(study.violin(method), figures, f"violin_{method}")
    written["fig9"] = save_figure(study.threshold_figure(), figures, "fig9_threshold")
    dense = dense_kn_sets(run_dirs)
    if len(dense):
        sensitivity = threshold_sensitivity(dense, score)
        written["threshold_sensitivity"] = write_table(sensitivity, tables, "threshold_sensitivity")
        written["threshold_sensitivity_fig"] = save_figure(
            sensitivity_figure(sensitivity), figures, "threshold_sensitivity"
        )
    written.update(write_strata_tables(run_dirs, kn_frame, dense, tables, figures, all_tokens_run))
    return written


@dataclass(frozen=True)
class ConsistencyRequest:
    run_dirs: list[Path] = setting(help="A localize run; repeat for several models.", flag="--run-dir")
    out_dir: Path | None = setting(
        None, "Where tables/ and figures/ go (default: the first run).", flag="--out"
    )
    strict: bool = setting(False, "Classify by strict CS (intersection / union).")
    all_tokens_run: Path | None = setting(
        None, "A localize run with --answer-tokens all on some of the same facts, for the CS ablation."
    )


def run(request: ConsistencyRequest) -> Outcome:
    out_dir = request.out_dir or request.run_dirs[0]
    score = "cs_strict" if request.strict else "cs_relaxed"
    written = write_consistency_report(request.run_dirs, out_dir, score, request.all_tokens_run)
    table = written["table1"].with_suffix(".md").read_text()
    return Outcome([table, *(f"{name}: {path}" for name, path in written.items())])


def reproduce(plan: Reproduction) -> list[tuple[str, Any]]:
    return [("KN consistency", ConsistencyRequest(run_dirs=[plan.directory]))]


STUDY = Study(
    name="consistency",
    summary="KN-consistency scores, KC/KI classes (static 0.1 and Otsu), Welch's t-test, Table 1 and "
    "Figures 3/7/8/9 from one or more localize runs.",
    request=ConsistencyRequest,
    run=run,
    panels=(
        Panel(10, "Table 1: KN consistency", ("table1",)),
        Panel(20, "Figures 3/7/8: CS per relation ({METHOD})", ("relations_{method}",), ("violin_{method}",)),
        Panel(30, "Figure 9: KI share as the threshold varies", ("fig9_ki_share",), ("fig9_threshold",)),
        Panel(
            40, "KN-rule sensitivity of the KI share", ("threshold_sensitivity",), ("threshold_sensitivity",)
        ),
        Panel(140, "KN consistency per fact", ("consistency",)),
    ),
    examples=(
        "qloc consistency --run-dir runs/smollm2 --run-dir runs/gemma3 --out runs/compare  "
        "# Table 1, Figures 3/7/8/9",
    ),
    reproduce=reproduce,
)
