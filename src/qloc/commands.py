"""The commands that are not studies: listing models, browsing facts, attributing one query, and
the report. Each is a request dataclass (its settings are the command's options, as for a study:
:mod:`qloc.settings`) and a function that prints what it found."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .data.selection import Selection
from .engine.attribution import Attribution, AttributionSettings, attribute
from .engine.gguf import BUILTIN_MODELS
from .engine.models import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, LoadedModel
from .report import open_in_browser, write_report
from .runs.executors import ModelSpec
from .runs.outputs import check_output_file, write_atomically
from .settings import setting
from .terminal import labelled, plain

out = Console()
err = Console(stderr=True)
JSON_HELP = "Machine-readable JSON output."
MODELS_EXAMPLES = (
    "qloc models                                   # built-in models and whether they are installed",
)
FACTS_EXAMPLES = ("qloc facts --facts-per-relation 1 --show 2    # browse and count the ParaRel facts",)
ATTRIBUTE_EXAMPLES = (
    'qloc attribute --prompt "The Eiffel Tower is located in the city of" --answer Paris --method amig '
    "--out scores.npy",
)
REPORT_EXAMPLES = (
    "qloc report --run-dir runs/smollm2 --run-dir runs/gemma3 "
    "# one self-contained HTML report (+ Markdown tables)",
)


@dataclass(frozen=True)
class Models:
    json_out: bool = setting(False, JSON_HELP, flag="--json")


def models(request: Models) -> None:
    """List the built-in models and whether they are installed."""
    rows: list[dict[str, Any]] = [
        {
            "name": m.name,
            "installed": m.installed(),
            "default": m.name == DEFAULT_MODEL,
            "description": m.description,
            "install": m.install_command(),
        }
        for m in BUILTIN_MODELS.values()
    ]
    if request.json_out:
        out.print_json(json.dumps(rows))
        return
    table = Table("name", "installed", "description", "install with")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(name, "yes" if r["installed"] else "no", r["description"], r["install"])
    out.print(table)
    out.print("Any Hugging Face id, local model directory or .gguf file also works as --model.")


@dataclass(frozen=True)
class Facts:
    selection: Selection = setting(factory=Selection)
    show: int = setting(0, "Print the queries of the first N selected facts.")
    json_out: bool = setting(False, JSON_HELP, flag="--json")


def facts(request: Facts) -> None:
    """Browse and count the ParaRel facts (usable facts, queries per relation)."""
    dataset, selected = request.selection.select()
    per_relation: dict[str, dict[str, Any]] = {}
    for fact in selected:
        empty = {"relation": fact.relation, "label": fact.relation_label, "facts": 0, "queries": 0}
        row = per_relation.setdefault(fact.relation, empty)
        row["facts"] += 1
        row["queries"] += len(fact.queries)
    shown = selected[: request.show]
    if request.json_out:
        payload = {
            "usable_facts": len(dataset.facts),
            "selected_facts": len(selected),
            "skipped": dict(dataset.skipped),
            "relations": list(per_relation.values()),
            "facts": [
                {"id": f.id, "subject": f.subject, "object": f.object, "queries": list(f.queries)}
                for f in shown
            ],
        }
        out.print_json(json.dumps(payload))
        return
    table = Table("relation", "label", "facts", "queries", "queries/fact")
    for r in per_relation.values():
        per_fact = r["queries"] / r["facts"]
        table.add_row(
            plain(r["relation"]), plain(r["label"]), str(r["facts"]), str(r["queries"]), f"{per_fact:.1f}"
        )
    queries = sum(r["queries"] for r in per_relation.values())
    table.add_row("all", "", str(len(selected)), str(queries), "", style="bold")
    out.print(table)
    for fact in shown:
        out.print()
        out.print(labelled(fact.id, "bold", f"{fact.subject!r} -> {fact.object!r}"), highlight=False)
        for q in fact.queries:
            out.print(plain(f"  {q} ___"), highlight=False)


@dataclass(frozen=True)
class Attribute:
    prompt: str = setting(help="The cloze prompt (text before the answer).")
    answer: str = setting(help="The answer (a leading space is added).")
    model: str = setting(DEFAULT_MODEL)
    method: str = setting("ig", "ig, amig, sig, or the first-order gxa or gxa-amig (METHODS.md section 3).")
    attribution: AttributionSettings = setting(factory=AttributionSettings)
    """Steps, rule, answer tokens and the KN-set cut (``--steps``, ..., ``--top-k``), as ``qloc
    localize`` takes them."""
    top: int = setting(10, "How many top neurons to print.")
    out_file: Path | None = setting(
        None, "Write the float32 [num_layers, d_ff] scores as .npy.", flag="--out"
    )
    max_batch_rows: int | None = setting(None)
    device: str = setting(DEFAULT_DEVICE)
    dtype: str = setting(DEFAULT_DTYPE)
    quiet: bool = setting(False)
    json_out: bool = setting(False, JSON_HELP, flag="--json")


def attribute_query(request: Attribute) -> None:
    """Attribution scores of every knowledge neuron for one query: top neurons, KN set and the
    per-layer completeness residuals."""
    if request.out_file is not None:
        check_output_file(request.out_file, "the scores")  # before the attribution, not after it
    lm = ModelSpec(request.model, request.device, request.dtype).load()
    result = _attribute_showing_warnings(lm, request)
    if request.out_file is not None:
        scores = result.scores.numpy().astype(np.float32)
        write_atomically(request.out_file, lambda out: np.save(out, scores))
    kn = request.attribution.kn_set(result)
    top = result.top(request.top)
    if request.json_out:
        out.print_json(json.dumps(_attribution_payload(request, result, top, kn)))
        return
    _print_top_and_kn_set(request, result, top, kn)
    _print_completeness(request, result)


def _attribute_showing_warnings(lm: LoadedModel, request: Attribute) -> Attribution:
    """The query's attribution; its warnings (such as a coarse rule's completeness residual) are
    printed on stderr in qloc's format, not as Python's warning lines with their source location."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = attribute(
            lm,
            request.prompt,
            request.answer,
            request.method,
            max_batch_rows=request.max_batch_rows,
            settings=request.attribution,
        )
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            err.print(labelled("warning:", "yellow", warning.message), highlight=False, soft_wrap=True)
    return result


def _attribution_payload(
    request: Attribute, result: Attribution, top: list[tuple[int, int, float]], kn: list[tuple[int, int]]
) -> dict[str, Any]:
    return {
        "model": request.model,
        "prompt": request.prompt,
        "answer": request.answer,
        **result.params,
        "answer_tokens": result.answer_tokens,
        "shape": list(result.scores.shape),
        "f_input": result.f_input.tolist(),
        "f_baseline": result.f_baseline.tolist(),
        "completeness_residual": result.completeness_residual.tolist(),
        "top": [{"layer": layer, "neuron": i, "score": v} for layer, i, v in top],
        "kn_set": [list(u) for u in kn],
        "out": str(request.out_file) if request.out_file else None,
    }


def _print_top_and_kn_set(
    request: Attribute, result: Attribution, top: list[tuple[int, int, float]], kn: list[tuple[int, int]]
) -> None:
    steps, rule = result.steps, result.rule  # the first-order methods have one rule of their own
    title = f"top {request.top} neurons ({request.method}, {steps} steps, {rule} rule)"
    table = Table("rank", "layer", "neuron", "score", title=title)
    for rank, (layer, neuron, value) in enumerate(top):
        table.add_row(str(rank), str(layer), str(neuron), f"{value:.4g}")
    out.print(table)
    cut = request.attribution
    rule = f"top {cut.top_k}" if cut.top_k else f"score >= {cut.threshold} x max"
    listed = ", ".join(f"L{layer}.{i}" for layer, i in kn[:30]) + (" ..." if len(kn) > 30 else "")
    out.print(plain(f"KN set ({rule}): {len(kn)} neurons {listed}"), highlight=False)


def _print_completeness(request: Attribute, result: Attribution) -> None:
    """Per layer: the sum of scores beside F(input) - F(baseline), which it should equal, and the
    residual; then F(input) per answer token."""
    title = "completeness per layer (mean over answer tokens; residual: worst token)"
    if request.method == "sig":
        title += (
            "; SIG scores are normalised per token path, the residual is of the raw per-path integrals summed"
        )
    layers = Table("layer", "sum of scores", "F(input) - F(baseline)", "residual", title=title)
    sums, residual = result.scores.sum(1), result.completeness_residual.max(0).values
    deltas = (result.f_input[:, None] - result.f_baseline).mean(0)
    for layer in range(result.scores.shape[0]):
        cells = (f"{float(sums[layer]):.4g}", f"{float(deltas[layer]):.4g}", f"{float(residual[layer]):.3g}")
        layers.add_row(str(layer), *cells)
    out.print(layers)
    f_input = ", ".join(f"{v:.4f}" for v in result.f_input.tolist())
    written = f"; scores written to {request.out_file}" if request.out_file else ""
    out.print(
        plain(f"F(input) = {f_input} for answer tokens {result.answer_tokens}{written}"), highlight=False
    )


@dataclass(frozen=True)
class Report:
    run_dirs: list[Path] = setting(
        help="A run directory, or a directory with tables/ and figures/; repeat for several.",
        flag="--run-dir",
    )
    out_file: Path | None = setting(
        None,
        "The HTML file (default: report.html in the first directory); the Markdown goes beside it.",
        flag="--out",
    )
    open_page: bool = setting(
        False, "Open the HTML file in the default browser (where there is a display).", flag="--open"
    )


def report(request: Report) -> None:
    """One self-contained HTML report (figures embedded; opens from disk): what the runs found beside
    the paper, every table beside its figure, a per-fact explorer, and each run's parameters,
    environment and skip counts; plus the findings and tables as Markdown."""
    written = write_report(request.run_dirs, request.out_file or request.run_dirs[0] / "report.html")
    for name, path in written.items():
        out.print(plain(f"{name}: {path}"), highlight=False)
    if request.open_page and not open_in_browser(written["html"]):
        out.print(plain(f"No display or browser here: open {written['html']} on a machine with one."))
