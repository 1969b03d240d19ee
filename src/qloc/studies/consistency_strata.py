"""Why a run's KN consistency differs from the paper's: Table 1 under each setting of an ablation,
split by knowledge, and by the number of queries per fact (METHODS.md section 4.1).

Every setting is computed from the KN sets (and, for other KN rules, the dense scores) a localize run
stored, so none needs a second attribution pass, except the answer-token setting, which reads a
second run made with ``--answer-tokens all`` on some of the same facts. Each row gives the split
under the static threshold and under Otsu's, so a reader can see which setting, if any, moves
CS_KC, CS_KI and R_KI to the paper's cells.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..data.paper_reference import paper_table
from ..engine.models import model_label
from ..runs.outputs import pyplot, save_figure, write_table
from ..runs.store import RunStore
from .consistency_tables import classify, fact_consistency
from .knsets import STATIC_THRESHOLD
from .statistics import welch
from .stored_knsets import LOCALIZE_STAGE, load_kn_sets

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KNOWN_QUERIES = 2
"""A fact is known when at least this many of its queries rank the answer's first token first (the
census's definition, METHODS.md section 9)."""
SHARED_SHARE = 0.10
"""Setting (c): neurons in the KN sets of more than this share of the run's facts are left out."""
QUERY_BINS = ((2, 2), (3, 4), (5, 6), (7, 9), (10, 10**6))
CS_COUNTS = {
    "relaxed (>= 2 queries)": "relaxed",
    "majority of queries": "majority",
    "all queries (strict)": "strict",
}
"""Setting (g): how many of a fact's queries must hold a KN for it to count in CS's numerator."""


def fact_cs(kn_frame: pd.DataFrame, count: str = "relaxed") -> pd.DataFrame:
    """Per (model, fact, method): queries, union size and CS under a count rule of :data:`CS_COUNTS`
    (``cs`` column), with the columns :func:`classify` needs."""
    frame = fact_consistency(kn_frame)
    return frame.assign(cs=frame[f"cs_{count}"])


def split_summary(classified: pd.DataFrame) -> dict[str, float]:
    """R_KI, CS_KC and CS_KI under the static and the Otsu threshold, and Welch's t (static)."""
    out: dict[str, float] = {"facts": len(classified), "cs_mean": float(classified["cs"].mean())}
    for threshold in ("static", "otsu"):
        ki = classified[classified[f"class_{threshold}"] == "KI"]["cs"]
        kc = classified[classified[f"class_{threshold}"] == "KC"]["cs"]
        out[f"R_KI_{threshold}"] = len(ki) / len(classified) if len(classified) else float("nan")
        out[f"CS_KC_{threshold}"] = float(kc.mean()) if len(kc) else float("nan")
        out[f"CS_KI_{threshold}"] = float(ki.mean()) if len(ki) else float("nan")
        if threshold == "static":
            out["t_static"] = welch(kc.tolist(), ki.tolist())[0]
    out["otsu_threshold"] = float(classified["otsu_threshold"].iloc[0]) if len(classified) else float("nan")
    return out


def summarize(kn_frame: pd.DataFrame, count: str = "relaxed") -> list[dict]:
    """One :func:`split_summary` row per (model, method) of ``kn_frame``'s facts."""
    if kn_frame.empty:
        return []
    classified = classify(fact_cs(kn_frame, count), score="cs")
    return [
        {"model": model, "method": method, **split_summary(group)}
        for (model, method), group in classified.groupby(["model", "method"], sort=False)
    ]


def known_facts(kn_frame: pd.DataFrame) -> set[str]:
    """Facts with at least :data:`KNOWN_QUERIES` queries whose answer ranks first."""
    queries = kn_frame.drop_duplicates(["fact_id", "query_index"])
    top1 = queries[queries["rank"] == 0].groupby("fact_id").size()
    return set(top1[top1 >= KNOWN_QUERIES].index)


def without_layers(kn_frame: pd.DataFrame, last: int, num_layers: int) -> pd.DataFrame:
    keep = num_layers - last
    return kn_frame.assign(kn=[[u for u in kn if u[0] < keep] for kn in kn_frame["kn"]])


def without_shared(kn_frame: pd.DataFrame, share: float = SHARED_SHARE) -> pd.DataFrame:
    """KN sets without the neurons that the KN sets of more than ``share`` of the run's facts hold
    (per model and method)."""
    parts = []
    for _, group in kn_frame.groupby(["model", "method"], sort=False):
        facts_holding: dict[tuple, set] = {}
        for fact_id, kn in zip(group["fact_id"], group["kn"]):
            for unit in kn:
                facts_holding.setdefault(tuple(unit), set()).add(fact_id)
        limit = share * group["fact_id"].nunique()
        shared = {u for u, facts in facts_holding.items() if len(facts) > limit}
        parts.append(group.assign(kn=[[u for u in kn if tuple(u) not in shared] for kn in group["kn"]]))
    return pd.concat(parts, ignore_index=True)


def two_queries(kn_frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each fact's queries subsampled to 2 (seeded; the same queries for every method)."""
    rng = random.Random(seed)
    chosen = {
        fact_id: set(rng.sample(sorted(set(group["query_index"])), 2))
        for fact_id, group in kn_frame.groupby("fact_id", sort=True)
    }
    return kn_frame[[q in chosen[f] for f, q in zip(kn_frame["fact_id"], kn_frame["query_index"])]]


@dataclass(frozen=True)
class Setting:
    group: str
    name: str
    frame: pd.DataFrame
    count: str = "relaxed"


def cs_ablation(
    kn_frame: pd.DataFrame,
    num_layers: int,
    dense: pd.DataFrame | None = None,
    all_tokens: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Table 1's split under each setting of the ablation (METHODS.md section 4.1): (a) first vs all
    answer tokens (``all_tokens``: KN sets of a run with ``--answer-tokens all``, compared on its
    facts only), (b) without the last 1 and 3 layers, (c) without shared neurons, (d) other KN rules
    (``dense``: rows of :func:`qloc.studies.stored_knsets.dense_kn_sets`), (e) known vs unknown facts,
    (f) 2 queries per fact vs all, (g) the count a KN needs to enter CS."""
    known = known_facts(kn_frame)
    settings = [Setting("-", "as run (relaxed CS)", kn_frame)]
    if all_tokens is not None and not all_tokens.empty:
        same = kn_frame[kn_frame["fact_id"].isin(set(all_tokens["fact_id"]))]
        settings += [
            Setting("a", "first answer token, facts of the all-tokens run", same),
            Setting("a", "all answer tokens (teacher-forced)", all_tokens),
        ]
    settings += [
        Setting("b", "without the last layer", without_layers(kn_frame, 1, num_layers)),
        Setting("b", "without the last 3 layers", without_layers(kn_frame, 3, num_layers)),
        Setting("c", f"without neurons of > {SHARED_SHARE:.0%} of facts", without_shared(kn_frame)),
    ]
    if dense is not None and not dense.empty:
        for rule in dict.fromkeys(dense["kn_rule"]):
            rule_frame = dense[dense["kn_rule"] == rule]
            name = (
                f"KN set: top {rule[3:]} neurons"
                if rule.startswith("top")
                else f"KN set: score >= {rule[2:]} x max"
            )
            settings.append(Setting("d", name, rule_frame))
    settings += [
        Setting("e", f"known facts ({len(known)})", kn_frame[kn_frame["fact_id"].isin(known)]),
        Setting("e", "unknown facts", kn_frame[~kn_frame["fact_id"].isin(known)]),
        Setting("f", "2 queries per fact (seeded)", two_queries(kn_frame)),
    ]
    settings += [Setting("g", name, kn_frame, count) for name, count in CS_COUNTS.items()]
    rows = []
    for setting in settings:
        for row in summarize(setting.frame, setting.count):
            rows.append({"group": setting.group, "setting": setting.name, **row})
    return pd.DataFrame(rows)


def table1_by_knowledge(kn_frame: pd.DataFrame) -> pd.DataFrame:
    """Table 1's split of the run's facts (classes and Otsu threshold from the whole run), summarised
    over the facts the model knows and those it does not."""
    classified = classify(fact_cs(kn_frame), score="cs")
    known = known_facts(kn_frame)
    classified["knowledge"] = np.where(classified["fact_id"].isin(known), "known", "unknown")
    rows = []
    for (model, method, knowledge), group in classified.groupby(["model", "method", "knowledge"], sort=False):
        rows.append({"model": model, "method": method, "knowledge": knowledge, **split_summary(group)})
    return pd.DataFrame(rows).sort_values(["model", "method", "knowledge"], ignore_index=True)


def cs_by_queries(kn_frame: pd.DataFrame) -> pd.DataFrame:
    """Mean CS (relaxed and strict) and the static KI share by the number of queries per fact."""
    frame = fact_consistency(kn_frame)
    rows = []
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        for low, high in QUERY_BINS:
            part = group[(group["queries"] >= low) & (group["queries"] <= high)]
            if part.empty:
                continue
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "queries": str(low) if low == high else f"{low}+" if high > 100 else f"{low}-{high}",
                    "facts": len(part),
                    "cs_relaxed": float(part["cs_relaxed"].mean()),
                    "cs_strict": float(part["cs_strict"].mean()),
                    "R_KI_static_relaxed": float((part["cs_relaxed"] < STATIC_THRESHOLD).mean()),
                    "R_KI_static_strict": float((part["cs_strict"] < STATIC_THRESHOLD).mean()),
                }
            )
    return pd.DataFrame(rows)


ABLATION_PANELS = (("R_KI_static", "R_KI (static 0.1)"), ("CS_KC_static", "CS_KC"), ("CS_KI_static", "CS_KI"))


def ablation_figure(ablation: pd.DataFrame, paper: pd.DataFrame | None = None) -> Figure:
    """The ablation as dots per setting and method, one panel per quantity of Table 1 (static
    threshold); ``paper``: the paper's Table 1 rows of one model, drawn as the band of its cells."""
    plt = pyplot()
    labels = [
        f"({g}) {s}" if g != "-" else s for g, s in dict.fromkeys(zip(ablation["group"], ablation["setting"]))
    ]
    position = {label: i for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(ABLATION_PANELS), figsize=(13, 0.32 * len(labels) + 1.6), sharey=True)
    for ax, (column, title) in zip(axes, ABLATION_PANELS):
        if paper is not None and not paper.empty:
            cells = paper[paper["threshold"] == "static"][column.removesuffix("_static")]
            label = f"paper, {paper['model'].iloc[0]} (its 3 methods)"
            if cells.min() == cells.max():  # a band of no width would not show
                ax.axvline(cells.min(), color="#f2b880", linewidth=3, label=label)
            else:
                ax.axvspan(cells.min(), cells.max(), color="#f2b880", alpha=0.5, linewidth=0, label=label)
        for (model, method), group in ablation.groupby(["model", "method"], sort=False):
            y = [position[f"({g}) {s}" if g != "-" else s] for g, s in zip(group["group"], group["setting"])]
            ax.scatter(group[column], y, s=18, label=f"{model} {method.upper()}")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def model_layers(run_dirs: Sequence[str | Path]) -> dict[str, int]:
    """Each run's model label and its number of layers, from the localize stage's environment."""
    layers = {}
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            stage = next((s for s in store.stages() if s["stage"] == LOCALIZE_STAGE), None)
            model = ((stage or {}).get("environment") or {}).get("model", {})
            if stage and model.get("num_layers"):
                layers[model_label(stage["params"]["model"])] = int(model["num_layers"])
    return layers


def write_strata_tables(
    run_dirs: Sequence[str | Path],
    kn_frame: pd.DataFrame,
    dense: pd.DataFrame,
    tables: Path,
    figures: Path,
    all_tokens_run: Path | None = None,
) -> dict[str, Path]:
    """``table1_by_knowledge``, ``cs_by_queries`` and, per model, ``cs_ablation[_<model>]`` with its
    figure beside the paper's cells of the closest model (GPT-2)."""
    written = {"cs_by_queries": write_table(cs_by_queries(kn_frame), tables, "cs_by_queries")}
    if kn_frame["rank"].notna().any():  # runs made before ranks were stored read None
        written["table1_by_knowledge"] = write_table(
            table1_by_knowledge(kn_frame), tables, "table1_by_knowledge"
        )
    all_tokens = load_kn_sets([all_tokens_run]) if all_tokens_run is not None else None
    layers = model_layers(run_dirs)
    models = [m for m in dict.fromkeys(kn_frame["model"]) if m in layers]
    paper = paper_table("table1")
    for model in models:
        name = "cs_ablation" if len(models) == 1 else f"cs_ablation_{model}"
        ablation = cs_ablation(
            kn_frame[kn_frame["model"] == model],
            layers[model],
            dense[dense["model"] == model] if len(dense) else None,
            all_tokens[all_tokens["model"] == model] if all_tokens is not None else None,
        )
        written[name] = write_table(ablation, tables, name)
        figure = ablation_figure(ablation, paper[paper["model"] == "GPT-2"])
        written[f"{name}_fig"] = save_figure(figure, figures, name)
    return written
