"""Method agreement (``qloc agreement``; METHODS.md section 3.1): how far a cheap attribution method's
KN sets are from those of the path methods a localize run stored.

On the queries of localize runs made with ``--save-scores``, the method (default gxa) is computed
afresh with the run's KN-set rule, and compared per query with each reference method's stored KN
set and dense scores: Jaccard of the KN sets, the share of the reference's KNs it finds (recall),
Spearman's rank correlation of all scores, and the overlap of the k best neurons. Per fact, the
KC/KI class of its KN sets (METHODS.md section 4, static 0.1 and Otsu) is compared too: a cheap
tier that keeps the classes can stand in for the consistency study even where sets differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..engine.attribution import METHODS, AttributionSettings, attribute, top_k
from ..engine.models import DEFAULT_DEVICE, LoadedModel, model_label
from ..errors import ConfigError, QlocError
from ..runs.executors import ModelSpec
from ..runs.outputs import check_writable, pyplot, save_figure, write_table
from ..runs.store import RunStore
from ..settings import setting
from .consistency_tables import classify, fact_consistency
from .knrows import DenseScoresRow, KnSetRow
from .registry import Outcome, Panel, Study
from .stored_knsets import LOCALIZE_STAGE, load_dense_scores

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OVERLAP_K = 50
"""The k of the top-k overlap: about the size of a KN set at t = 0.2 on the built-in models."""
THRESHOLDS = ("static", "otsu")


def overlap(found: Sequence[tuple[int, int]], reference: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Jaccard of two KN sets (1 where both are empty) and the share of ``reference`` in ``found``
    (NaN where ``reference`` is empty: there is nothing to find)."""
    a, b = set(found), set(reference)
    union = a | b
    jaccard = len(a & b) / len(union) if union else 1.0
    return jaccard, len(a & b) / len(b) if b else float("nan")


def query_agreement(
    scores: torch.Tensor,
    found: Sequence[tuple[int, int]],
    reference_scores: torch.Tensor,
    reference_set: Sequence[tuple[int, int]],
    overlap_k: int = OVERLAP_K,
) -> dict[str, float]:
    """The per-query measures of one method against one reference: KN-set Jaccard and recall, the
    Spearman correlation of all scores (NaN where either is constant), the top-k overlap, and what
    a hybrid would get that runs the reference exactly on the layers the method's KN set marks
    (:func:`hybrid_measures`)."""
    jaccard, recall = overlap(found, reference_set)
    flat, reference_flat = scores.flatten().numpy(), reference_scores.flatten().numpy()
    constant = float(flat.std()) == 0 or float(reference_flat.std()) == 0
    spearman = float("nan") if constant else float(stats.spearmanr(flat, reference_flat).statistic)
    best = set(top_k(scores, overlap_k)) & set(top_k(reference_scores, overlap_k))
    return {
        "jaccard": jaccard,
        "recall": recall,
        "same_kn_set": float(set(found) == set(reference_set)),
        "spearman": spearman,
        f"top{overlap_k}_overlap": len(best) / min(overlap_k, scores.numel()),
        **hybrid_measures(found, reference_scores, reference_set),
    }


def hybrid_measures(
    found: Sequence[tuple[int, int]], reference_scores: torch.Tensor, reference_set: Sequence[tuple[int, int]]
) -> dict[str, float]:
    """The hybrid that attributes exactly (the reference) only on the layers holding the method's
    KNs, without running it: it gets the reference's KN set exactly where every reference KN and
    the reference's top score lie in those layers (the threshold is relative to the top score).
    ``hybrid_recall``: the share of the reference's KNs in the marked layers; ``hybrid_cost``: the
    share of the reference's path rows it would run (a row at layer l runs the L - l layers from l
    up), besides the method itself."""
    num_layers = reference_scores.shape[0]
    marked = {layer for layer, _ in found}
    inside = [u for u in reference_set if u[0] in marked]
    top_layer = int(reference_scores.flatten().argmax()) // reference_scores.shape[1]
    row_layers = [num_layers - layer for layer in range(num_layers)]
    return {
        "marked_layers": len(marked),
        "hybrid_recall": len(inside) / len(reference_set) if reference_set else float("nan"),
        "hybrid_exact": float(len(inside) == len(reference_set) and top_layer in marked),
        "hybrid_cost": sum(row_layers[layer] for layer in marked) / sum(row_layers),
    }


@dataclass
class Agreement:
    """Everything ``qloc agreement`` writes."""

    queries: pd.DataFrame
    """Per (model, query, reference): the method's and the reference's set sizes and the measures."""
    facts: pd.DataFrame
    """Per (model, fact, reference): CS and KC/KI classes of both, and whether each class agrees."""
    summary: pd.DataFrame
    """Per (model, method, reference): means (and medians) of the measures, class agreement, speed."""


def run_queries(
    store: RunStore, references: Sequence[str]
) -> tuple[pd.DataFrame, dict[tuple[str, int, str], torch.Tensor]]:
    """The run's KN-set rows of the reference methods that have dense scores, and those scores by
    (fact, query, method)."""
    if "dense_scores" not in store.tables():
        raise QlocError(f"{store.run_dir} holds no dense scores: make the localize run with --save-scores")
    dense = store.frame(DenseScoresRow)
    missing = sorted(set(references) - set(dense["method"]))
    if missing:
        raise QlocError(
            f"{store.run_dir} has no dense scores of {', '.join(missing)} "
            f"(it has {', '.join(sorted(set(dense.method)))})"
        )
    scores = {
        (row.fact_id, int(row.query_index), row.method): torch.from_numpy(
            load_dense_scores(row.scores_npz).astype(np.float32)
        )
        for row in dense[dense.method.isin(references)].itertuples()
    }
    rows = store.frame(KnSetRow)
    rows = rows[rows.method.isin(references)]
    keep = [(f, int(q), m) in scores for f, q, m in zip(rows.fact_id, rows.query_index, rows.method)]
    return rows[keep], scores


KN_COLUMNS = ["model", "fact_id", "relation", "method", "query_index", "kn"]
"""The KN-set columns :func:`fact_classes` reads, for the method's sets and the references'."""


def method_agreement(
    run_dirs: Sequence[str | Path],
    method: str = "gxa",
    references: Sequence[str] = ("ig", "amig"),
    overlap_k: int = OVERLAP_K,
    facts: int | None = None,
    device: str = DEFAULT_DEVICE,
    lm: LoadedModel | None = None,
) -> Agreement:
    """Compute ``method`` on the queries of each localize run (its model in the run's dtype, or
    ``lm``; the first ``facts`` facts only, where given) with the run's KN-set rule, steps, rule
    and answer tokens, and compare it with the run's ``references``."""
    if method not in METHODS:
        raise ConfigError.invalid("method", method, f"choose {', '.join(METHODS)}")
    if method in references:
        raise ConfigError.invalid("references", ",".join(references), f"{method} is the method compared")
    query_rows: list[dict[str, Any]] = []
    kn_rows: list[pd.DataFrame] = []
    for run_dir in run_dirs:
        params, rows, reference_scores = _read_run(run_dir, references, facts)
        model = lm or ModelSpec(params["model"], device, params["dtype"]).load()
        label, settings = model_label(params["model"]), AttributionSettings.from_params(params)
        run = _RunAgreement(model, label, settings, method, reference_scores, overlap_k)
        kn_rows.append(rows.assign(model=run.label)[KN_COLUMNS])
        for (fact_id, query_index), group in rows.groupby(["fact_id", "query_index"], sort=False):
            kn_row, measured = run.compare(fact_id, query_index, group)
            kn_rows.append(kn_row)
            query_rows += measured
    queries = pd.DataFrame(query_rows)
    fact_rows = fact_classes(pd.concat(kn_rows, ignore_index=True), method, references)
    return Agreement(queries, fact_rows, summarize(queries, fact_rows, overlap_k))


def _read_run(
    run_dir: str | Path, references: Sequence[str], facts: int | None
) -> tuple[dict[str, Any], pd.DataFrame, dict[tuple[str, int, str], torch.Tensor]]:
    """A localize run's parameters, its reference KN-set rows (of its first ``facts`` facts, where
    given) and their dense scores."""
    with RunStore.open_existing(run_dir) as store:
        params = store.params(LOCALIZE_STAGE)
        rows, reference_scores = run_queries(store, references)
    if facts is not None:
        rows = rows[rows.fact_id.isin(list(dict.fromkeys(rows.fact_id))[:facts])]
    return params, rows, reference_scores


@dataclass
class _RunAgreement:
    """The method computed afresh on one localize run's queries, with the run's settings, and
    compared with the run's references."""

    model: LoadedModel
    label: str
    settings: AttributionSettings
    """The localize run's: steps, rule, answer tokens and the KN-set cut."""
    method: str
    reference_scores: dict[tuple[str, int, str], torch.Tensor]
    overlap_k: int

    def compare(
        self, fact_id: str, query_index: int, group: pd.DataFrame
    ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """The method's KN-set row for one query (``group``: its reference rows), and one row of
        measures per reference."""
        first = group.iloc[0]
        started = time.perf_counter()
        found = attribute(
            self.model, first.prompt, first.answer, self.method, warn=False, settings=self.settings
        )
        seconds = time.perf_counter() - started
        kn = self.settings.kn_set(found)
        kn_row = pd.DataFrame(
            [[self.label, fact_id, first.relation, self.method, query_index, [list(u) for u in kn]]],
            columns=KN_COLUMNS,
        )
        measured = []
        for reference in group.itertuples():
            reference_set = [tuple(u) for u in reference.kn]
            measures = query_agreement(
                found.scores,
                kn,
                self.reference_scores[(fact_id, int(query_index), reference.method)],
                reference_set,
                self.overlap_k,
            )
            measured.append(
                {
                    "model": self.label,
                    "fact_id": fact_id,
                    "relation": first.relation,
                    "query_index": int(query_index),
                    "method": self.method,
                    "reference": reference.method,
                    "kn_size": len(kn),
                    "reference_kn_size": len(reference_set),
                    **measures,
                    "max_residual": float(found.completeness_residual.max()),
                    "f_input": float(found.f_input[0]),
                    "seconds": seconds,
                    "reference_seconds": float(reference.seconds),
                }
            )
        return kn_row, measured


def fact_classes(kn_frame: pd.DataFrame, method: str, references: Sequence[str]) -> pd.DataFrame:
    """Per fact and reference: the KC/KI classes of the method's and the reference's query KN sets
    (static and Otsu thresholds, each method's Otsu threshold over the run's facts), and whether
    they agree."""
    classified = classify(fact_consistency(kn_frame)).set_index(["model", "fact_id", "method"])
    rows = []
    for model, fact_id, relation in (
        kn_frame[["model", "fact_id", "relation"]].drop_duplicates().itertuples(index=False)
    ):
        mine = classified.loc[(model, fact_id, method)]
        for reference in references:
            theirs = classified.loc[(model, fact_id, reference)]
            row = {
                "model": model,
                "fact_id": fact_id,
                "relation": relation,
                "method": method,
                "reference": reference,
                "cs": mine["cs_relaxed"],
                "reference_cs": theirs["cs_relaxed"],
            }
            for threshold in THRESHOLDS:
                row[f"class_{threshold}"] = mine[f"class_{threshold}"]
                row[f"reference_class_{threshold}"] = theirs[f"class_{threshold}"]
                row[f"agree_{threshold}"] = mine[f"class_{threshold}"] == theirs[f"class_{threshold}"]
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(queries: pd.DataFrame, facts: pd.DataFrame, overlap_k: int = OVERLAP_K) -> pd.DataFrame:
    """Per (model, method, reference): query count, mean and median Jaccard, mean recall, the share
    of identical KN sets, mean and median Spearman, mean top-k overlap, the share of facts whose
    KC/KI class agrees (static, Otsu), the hybrid's mean recall, share of exact sets and mean cost
    (:func:`hybrid_measures`), and the speed-up over the reference's stored seconds (the localize
    run's timing, which may come from another machine state)."""
    rows = []
    for (model, method, reference), group in queries.groupby(["model", "method", "reference"], sort=False):
        by_fact = facts[(facts.model == model) & (facts.reference == reference)]
        rows.append(
            {
                "model": model,
                "method": method,
                "reference": reference,
                "queries": len(group),
                "facts": len(by_fact),
                "jaccard_mean": group["jaccard"].mean(),
                "jaccard_median": group["jaccard"].median(),
                "recall_mean": group["recall"].mean(),
                "same_kn_set": group["same_kn_set"].mean(),
                "spearman_mean": group["spearman"].mean(),
                "spearman_median": group["spearman"].median(),
                f"top{overlap_k}_overlap_mean": group[f"top{overlap_k}_overlap"].mean(),
                "hybrid_recall_mean": group["hybrid_recall"].mean(),
                "hybrid_exact": group["hybrid_exact"].mean(),
                "hybrid_cost_mean": group["hybrid_cost"].mean(),
                "class_agree_static": by_fact["agree_static"].mean(),
                "class_agree_otsu": by_fact["agree_otsu"].mean(),
                "seconds_mean": group["seconds"].mean(),
                "speedup_vs_stored": group["reference_seconds"].mean() / group["seconds"].mean(),
            }
        )
    return pd.DataFrame(rows)


def agreement_figure(queries: pd.DataFrame, overlap_k: int = OVERLAP_K) -> Figure:
    """One panel per measure (Jaccard, recall, Spearman, top-k overlap): a box per (model, reference)
    over the queries."""
    plt = pyplot()
    measures = ["jaccard", "recall", "spearman", f"top{overlap_k}_overlap"]
    groups = list(queries.groupby(["model", "reference"], sort=False))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.6), squeeze=False)
    method = queries["method"].iloc[0]
    for ax, measure in zip(axes[0], measures):
        values = [group[measure].dropna().to_numpy() for _, group in groups]
        ax.boxplot(values, showmeans=True)
        ax.set_xticks(
            range(1, len(groups) + 1), [f"{model}\nvs {ref}" for (model, ref), _ in groups], fontsize=7
        )
        ax.set_title(measure.replace("_", " "))
        ax.set_ylim(-0.05 if measure != "spearman" else -1.05, 1.05)
    fig.suptitle(f"{method} against the path methods, per query")
    fig.tight_layout()
    return fig


def write_method_agreement(
    agreement: Agreement, out_dir: str | Path, overlap_k: int = OVERLAP_K
) -> dict[str, Path]:
    """``tables/method_agreement.csv`` (per query), ``method_agreement_facts.csv``,
    ``method_agreement_summary`` (CSV and Markdown) and ``figures/method_agreement``."""
    tables, figures = Path(out_dir) / "tables", Path(out_dir) / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    agreement.queries.to_csv(tables / "method_agreement.csv", index=False)
    agreement.facts.to_csv(tables / "method_agreement_facts.csv", index=False)
    return {
        "queries": tables / "method_agreement.csv",
        "facts": tables / "method_agreement_facts.csv",
        "summary": write_table(agreement.summary, tables, "method_agreement_summary"),
        "figure": save_figure(agreement_figure(agreement.queries, overlap_k), figures, "method_agreement"),
    }


@dataclass(frozen=True)
class AgreementRequest:
    run_dirs: list[Path] = setting(
        help="A localize run made with --save-scores; repeat for several models.", flag="--run-dir"
    )
    method: str = setting("gxa", "The method to calibrate, computed here on the runs' queries.")
    references: tuple[str, ...] = setting(
        ("ig", "amig"), "Comma-separated methods of the runs to compare with.", flag="--reference"
    )
    out_dir: Path | None = setting(
        None, "Where tables/ and figures/ go (default: the first run).", flag="--out"
    )
    overlap_k: int = setting(OVERLAP_K, "The k of the top-k overlap.")
    facts: int | None = setting(None, "Only the first N facts of each run.")
    device: str = setting(DEFAULT_DEVICE)


def run(request: AgreementRequest) -> Outcome:
    out_dir = request.out_dir or request.run_dirs[0]
    check_writable(out_dir, "tables and figures")
    agreement = method_agreement(
        request.run_dirs, request.method, request.references, request.overlap_k, request.facts, request.device
    )
    written = write_method_agreement(agreement, out_dir, request.overlap_k)
    table = written["summary"].with_suffix(".md").read_text()
    return Outcome([table, *(f"{name}: {path}" for name, path in written.items())])


STUDY = Study(
    name="agreement",
    summary="How far a cheap attribution method (default gxa) is from a localize run's IG and AMIG: "
    "per query KN-set Jaccard and recall, Spearman of the scores and top-k overlap, per fact KC/KI "
    "class agreement (static and Otsu), a summary and a figure. Needs a run made with --save-scores.",
    request=AgreementRequest,
    run=run,
    panels=(
        Panel(
            45,
            "First-order tier against the path methods",
            ("method_agreement_summary",),
            ("method_agreement",),
        ),
    ),
    examples=(
        "qloc agreement --run-dir runs/smollm2 --method gxa --reference ig,amig  "
        "# how far gxa's KN sets are from IG's and AMIG's",
    ),
)
