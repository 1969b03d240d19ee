"""KN consistency, the study (METHODS.md section 4; the paper's section 2.1, Table 1, Figures 3, 7,
8, 9): ``qloc consistency`` reads the KN sets stored by ``qloc localize`` and writes Table 1 with
its chance baseline, the per-fact scores, the violin plots, Figure 9, the KN-rule sensitivity and
the strata and ablation of section 4.1. The numbers come from :mod:`qloc.studies.consistency_tables`
and :mod:`qloc.studies.consistency_strata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..runs.outputs import check_writable, save_figure, write_csv, write_table
from ..settings import setting
from . import consistency_claims
from .consistency_figures import sensitivity_figure, threshold_figure, violin_figure
from .consistency_strata import write_strata_tables
from .consistency_tables import (
    NULL_PERCENTILE,
    PER_FACT_COLUMNS,
    classify,
    fact_consistency,
    ki_share_curve,
    null_consistency,
    null_summary,
    relation_summary,
    table1,
    threshold_sensitivity,
)
from .registry import Outcome, Panel, Reproduction, Study
from .stored_knsets import dense_kn_sets, load_kn_sets

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
CONSISTENCY_OUTPUT_PREFIXES = (
    "relations_",
    "violin_",
    "threshold_sensitivity",
    "cs_ablation",
    "cs_by_queries",
    "table1_by_knowledge",
)
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
    captions=consistency_claims.CAPTIONS,
    claims=consistency_claims.ConsistencyClaims,
    examples=(
        "qloc consistency --run-dir runs/smollm2 --run-dir runs/gemma3 --out runs/compare  "
        "# Table 1, Figures 3/7/8/9",
    ),
    reproduce=reproduce,
)
