"""The ``qloc`` command line: a thin layer over the Python API."""

from __future__ import annotations

import contextlib
import json
from functools import partial
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import QlocError

app = typer.Typer(
    help="Knowledge localization in language models: knowledge neurons, KN consistency, query localization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

# -- options shared by every command that loads a model or reads facts -------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name (see `qloc models`), .gguf file, local directory or Hugging Face id.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, auto, or map (one model over several GPUs, accelerate's device_map=auto).")]
DtypeOpt = Annotated[str, typer.Option(help="Model weights: float32, bfloat16 or float16 (softmax and attribution arithmetic stay fp32).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="A data_all_allbags.json(.gz) file; default: the ParaRel copy shipped with qloc.")]
RelationsOpt = Annotated[Optional[str], typer.Option(help="Comma-separated relation ids, e.g. P19,P36.")]
PerRelationOpt = Annotated[Optional[int], typer.Option("--facts-per-relation", help="Seeded sample of at most N facts per relation.")]
LimitOpt = Annotated[Optional[int], typer.Option(help="Seeded sample of at most N facts in all (after --facts-per-relation).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for every sampling step.")]
QueryFilterOpt = Annotated[str, typer.Option(help="mask_final: [MASK] ends the query (METHODS.md); mask_period: the query ends with '[MASK].'.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Store results here (resumable).")]
BatchOpt = Annotated[int, typer.Option(help="Queries per forward pass.")]
# -- attribution options, shared by `attribute` and `localize` -------------------------------
StepsOpt = Annotated[int, typer.Option(help="Integration steps m.")]
RuleOpt = Annotated[str, typer.Option(help="right (the paper's eq. 8), midpoint or gauss (Gauss-Legendre).")]
AnswerTokensOpt = Annotated[str, typer.Option(help="first: F = P(first answer token), the default; all: average over teacher-forced answer tokens.")]
ThresholdOpt = Annotated[float, typer.Option(help="KN set: score >= threshold * max score.")]
TopKOpt = Annotated[Optional[int], typer.Option(help="KN set: the k best neurons instead of the threshold.")]
MaxRowsOpt = Annotated[Optional[int], typer.Option(help="Rows per forward/backward chunk (default: automatic).")]
# -- the experiments that read a localize run ---------------------------------------------------
LocalizedRunOpt = Annotated[Path, typer.Option("--run-dir", help="A localize run: its model, facts and KN sets are used.")]
KnMethodOpt = Annotated[Optional[str], typer.Option(help="Whose KN sets (default: the run's first method).")]
FactLimitOpt = Annotated[Optional[int], typer.Option(
    help="Only the first N of the run's facts in a seeded order (raise it later to extend the run).")]
SharedFilterOpt = Annotated[str, typer.Option(
    "--shared-filter", help="Drop KNs held by more than this share of the relation's facts before the experiment "
    "(Dai et al.: 0.1; relations with under 50 facts in the run count over all its facts), or off.")]
# -- where a sweep runs, shared by every sweep command ------------------------------------------
ExecutorOpt = Annotated[str, typer.Option(help="local (this process) or ray (one model replica per GPU, or per CPU core with --workers).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster: auto, HOST:PORT (default: start a local one).")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Ray: model replicas (default: one per GPU, else one per CPU core).")]
# -- the census and the known filter (METHODS.md section 9) --------------------------------------
CensusDtypeOpt = Annotated[str, typer.Option(
    "--census-dtype", help="auto (float32 on CPUs, bfloat16 on GPUs), float32, or bfloat16 (queries near the "
    "top-10 re-scored in fp32: ranks below 10 stay exact).")]
KnownOpt = Annotated[str, typer.Option(
    help="Keep the queries whose answer's first token ranks below K (known at top-K) and the facts with >= 2 "
    "of them, then sample; all: no filter.")]
CensusDirOpt = Annotated[Optional[Path], typer.Option(
    "--census", help="With --known: a census run of the same model, data and query filter (default: census "
    "the candidate facts into --run-dir).")]
KnownPoolOpt = Annotated[Optional[int], typer.Option(
    "--known-pool", help="With --known: census a seeded sample of N facts per relation and sample among its "
    "known facts (default: every fact).")]


INTERRUPTED = "interrupted; finished facts are stored and the same command resumes"


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, never a bare traceback."""
    try:
        app()
    except QlocError as exc:
        # Messages quote user input (paths, prompts, data rows): print it literally, not as markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as exc:
        # Typer turns Ctrl-C into exit status 130 before it could reach an except KeyboardInterrupt.
        if exc.code == 130:
            err.print(INTERRUPTED, highlight=False)
        raise
    except KeyboardInterrupt:
        err.print(INTERRUPTED, highlight=False)
        sys.exit(130)


def _load(model: str, device: str, dtype: str, quiet: bool):
    import transformers

    from .models import load_model

    transformers.utils.logging.disable_progress_bar()  # qloc shows its own progress
    if not quiet:
        err.print(f"loading {escape(model)} ...", highlight=False)
    return load_model(model, device=device, dtype=dtype)


def _select(data, relations, facts_per_relation, limit, seed, query_filter, quiet):
    from .pararel import load_pararel, sample_facts

    if query_filter not in ("mask_final", "mask_period"):
        raise QlocError(f"--query-filter {query_filter!r}: choose mask_final or mask_period")
    dataset = load_pararel(data, query_filter=query_filter)
    for warning in dataset.warnings[:20]:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if len(dataset.warnings) > 20:
        err.print(f"[yellow]warning:[/] ... and {len(dataset.warnings) - 20} more malformed rows", highlight=False)
    rel_list = [r.strip() for r in relations.split(",") if r.strip()] if relations else None
    source = f"ParaRel file {str(data)!r}" if data else "the bundled ParaRel"
    usable = set(dataset.relations)
    if unusable := [r for r in rel_list or [] if r in dataset.file_relations and r not in usable]:
        raise QlocError(f"relation(s) {', '.join(unusable)} of {source} have no usable fact: their rows are "
                        "malformed or leave fewer than 2 usable queries per fact (see the warnings)")
    facts = sample_facts(dataset.facts, rel_list, facts_per_relation, limit, seed)
    skipped = ", ".join(f"{n} {reason}" for reason, n in dataset.skipped.items()) or "none"
    if not facts:
        why = ("--facts-per-relation 0" if facts_per_relation == 0 else "--limit 0" if limit == 0
               else f"{source} has no usable fact (skipped: {skipped})")
        raise QlocError(f"0 facts selected: {why}; nothing to do")
    if not quiet:
        err.print(f"{len(facts)} facts selected of {len(dataset.facts)} usable (skipped: {skipped})", highlight=False)
    return dataset, facts


def _sampling_params(data, relations, facts_per_relation, limit, seed, query_filter) -> dict:
    return {
        "data": str(data) if data else "bundled",
        "relations": relations,
        "facts_per_relation": facts_per_relation,
        "limit": limit,
        "seed": seed,
        "query_filter": query_filter,
    }


def _select_known(k, census_dir, known_pool, run_dir, model, device, executor, ray_address, workers,
                  data, relations, facts_per_relation, limit, seed, query_filter, quiet):
    """The facts of --known K: the candidates (every fact of the relations, or a seeded pool of
    --known-pool per relation) are looked up in the census (scored first, into the run directory,
    unless --census names one); each keeps its queries ranked below K, facts with >= 2 survive,
    and the seeded --facts-per-relation / --limit sample is drawn from the survivors."""
    from .census import EXACT_RANKS, census_plan, keep_known, read_census
    from .pararel import sample_facts

    if known_pool is not None and known_pool < 1:
        raise QlocError(f"--known-pool {known_pool}: must be at least 1")
    _, candidates = _select(data, relations, known_pool, None, seed, query_filter, quiet=True)
    census_params = {"model": model,
                     **_sampling_params(data, relations, known_pool, None, seed, query_filter)}
    if census_dir is None:
        # Ranks from 10 on are exact only in float32 (a bfloat16 census re-scores just the top).
        precision = "float32" if k > EXACT_RANKS else "auto"
        _execute(census_plan(run_dir, model, device, candidates, census_params, precision, batch_size=128),
                 executor, ray_address, workers, quiet)
    rows = read_census(census_dir or run_dir, candidates, census_params)
    kept = keep_known(candidates, rows, k)
    selected = sample_facts(kept, None, facts_per_relation, limit, seed)
    kept_queries = sum(len(f.queries) for f in kept)
    err.print(f"--known {k}: {len(kept)} of {len(candidates)} facts have >= 2 queries ranked below {k} "
              f"({kept_queries} of {len(rows)} queries kept); {len(selected)} facts sampled", highlight=False)
    if not selected:
        raise QlocError(f"--known {k}: no fact of the selected relations has >= 2 queries ranked below {k}; "
                        "try a larger K, more relations or a larger --known-pool")
    return selected


@app.command()
def models(json_out: JsonOpt = False) -> None:
    """List the built-in models and whether they are installed."""
    from .models import BUILTIN_MODELS, DEFAULT_MODEL

    rows = [
        {"name": m.name, "installed": m.installed(), "default": m.name == DEFAULT_MODEL, "description": m.description,
         "install": m.install_command()}
        for m in BUILTIN_MODELS.values()
    ]
    if json_out:
        out.print_json(json.dumps(rows))
        return
    table = Table("name", "installed", "description", "install with")
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), "yes" if r["installed"] else "no", r["description"], r["install"])
    out.print(table)
    out.print("Any Hugging Face id, local model directory or .gguf file also works as --model.")


@app.command()
def facts(
    data: DataOpt = None,
    relations: RelationsOpt = None,
    facts_per_relation: PerRelationOpt = None,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    query_filter: QueryFilterOpt = "mask_final",
    show: Annotated[int, typer.Option(help="Print the queries of the first N selected facts.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Browse and count the ParaRel facts (usable facts, queries per relation)."""
    dataset, selected = _select(data, relations, facts_per_relation, limit, seed, query_filter, quiet=json_out)
    per_relation: dict[str, dict] = {}
    for fact in selected:
        row = per_relation.setdefault(fact.relation, {"relation": fact.relation, "label": fact.relation_label, "facts": 0, "queries": 0})
        row["facts"] += 1
        row["queries"] += len(fact.queries)
    if json_out:
        payload = {
            "usable_facts": len(dataset.facts),
            "selected_facts": len(selected),
            "skipped": dict(dataset.skipped),
            "relations": list(per_relation.values()),
            "facts": [{"id": f.id, "subject": f.subject, "object": f.object, "queries": list(f.queries)} for f in selected[:show]],
        }
        out.print_json(json.dumps(payload))
        return
    table = Table("relation", "label", "facts", "queries", "queries/fact")
    for r in per_relation.values():
        table.add_row(r["relation"], r["label"], str(r["facts"]), str(r["queries"]), f"{r['queries'] / r['facts']:.1f}")
    table.add_row("all", "", str(len(selected)), str(sum(r["queries"] for r in per_relation.values())), "", style="bold")
    out.print(table)
    for fact in selected[:show]:
        subject, answer = escape(repr(fact.subject)), escape(repr(fact.object))
        out.print(f"\n[bold]{fact.id}[/] {subject} -> {answer}", highlight=False)
        for q in fact.queries:
            out.print(f"  {escape(q)} ___", highlight=False)


@app.command()
def cloze(
    model: ModelOpt = "smollm2-135m",
    prompt: Annotated[Optional[str], typer.Option(help="Score this prompt (needs --answer) instead of ParaRel queries.")] = None,
    answer: Annotated[Optional[str], typer.Option(help="The answer to score after --prompt (a leading space is added).")] = None,
    run_dir: RunDirOpt = None,
    data: DataOpt = None,
    relations: RelationsOpt = None,
    facts_per_relation: PerRelationOpt = None,
    limit: LimitOpt = 5,
    seed: SeedOpt = 0,
    query_filter: QueryFilterOpt = "mask_final",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 16,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Score answers after cloze prompts: probability and rank of the first answer token and the
    teacher-forced log-probability of the whole answer."""
    from .cloze import cloze_sweep_work, score_cloze
    from .store import RunLock, RunStore
    from .sweep import run_sweep

    if (prompt is None) != (answer is None):
        raise QlocError("--prompt and --answer go together")
    if prompt is not None:
        lm = _load(model, device, dtype, quiet or json_out)
        score = score_cloze(lm, [prompt], [answer])[0]
        if json_out:
            out.print_json(json.dumps(score.to_dict()))
        else:
            out.print(f"P({answer!r} | {prompt!r}) = {score.prob:.4f}, rank {score.rank}, log P(answer) = {score.logprob:.4f}, top token {score.top_token!r}", highlight=False)
        return

    _, selected = _select(data, relations, facts_per_relation, limit, seed, query_filter, quiet or json_out)
    params = {"model": model, "dtype": dtype, **_sampling_params(data, relations, facts_per_relation, limit, seed, query_filter)}
    with contextlib.ExitStack() as scratch:
        # Without --run-dir, results go to a temporary run that is removed afterwards.
        directory = run_dir or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="qloc-cloze-")))
        # Refuse a directory another sweep writes, or other parameters, before loading the model.
        scratch.enter_context(RunLock.acquire(directory))
        RunStore.check_stage(directory, "cloze", params)
        lm = _load(model, device, dtype, quiet or json_out)
        with RunStore.open_stage(directory, "cloze", params, _env(lm)) as store:
            summary = run_sweep(store, "cloze", selected, cloze_sweep_work(lm, batch_size), quiet=quiet or json_out)
            frame = store.frame("cloze") if "cloze" in store.tables() else None
    if frame is not None:
        frame = frame[frame["fact_id"].isin({f.id for f in selected})]
    if json_out:
        for record in ([] if frame is None else frame.drop(columns=["stage", "unit_id"]).to_dict("records")):
            out.print(json.dumps(record, ensure_ascii=False), highlight=False, soft_wrap=True)
        return
    _print_cloze_summary(frame, summary)


def _shared_filter(value: str) -> float | None:
    if value.strip().lower() == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise QlocError(f"--shared-filter {value!r}: a share such as 0.1, or off") from None


@app.command()
def census(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory (created, or resumed).")],
    model: ModelOpt = "smollm2-135m",
    data: DataOpt = None,
    relations: RelationsOpt = None,
    facts_per_relation: PerRelationOpt = None,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    query_filter: QueryFilterOpt = "mask_final",
    census_dtype: CensusDtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Queries per forward pass (all of one length).")] = 128,
    device: DeviceOpt = "auto",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """What the model knows: rank and probability of the answer's first token after every usable
    query of the selected facts (default: all of ParaRel), in chunks of 256 facts (resumable);
    tables/census_relations.csv|md and figures/census_relations.png|svg per relation."""
    from .census import STAGE, census_figure, census_plan, census_table
    from .outputs import markdown_table, save_figure, write_table
    from .store import RunStore

    dataset, selected = _select(data, relations, facts_per_relation, limit, seed, query_filter, quiet)
    params = {"model": model,
              **_sampling_params(data, relations, facts_per_relation, limit, seed, query_filter)}
    summary = _execute(census_plan(run_dir, model, device, selected, params, census_dtype, batch_size),
                       executor, ray_address, workers, quiet)
    with RunStore.open_existing(run_dir) as store:
        if STAGE not in store.tables():
            raise QlocError(f"no fact of {str(run_dir)!r} could be scored ({dict(summary.skip_reasons)})")
        rows, seconds = store.frame(STAGE), store.units(STAGE)["seconds"].sum()
    table = census_table(rows, {f.relation: f.relation_label for f in dataset.facts})
    csv = write_table(table, run_dir / "tables", "census_relations")
    png = save_figure(census_figure(table, model), run_dir / "figures", "census_relations")
    out.print(markdown_table(table), highlight=False, soft_wrap=True)
    rescored = (rows["scored_in"] == "float32").mean()
    out.print(f"chunks: {summary.describe()}; {len(rows)} queries in {seconds:.0f} s of scoring "
              f"({len(rows) / max(seconds, 1e-9):.1f} queries/s; {100 * rescored:.0f}% scored in float32); "
              f"{csv}, {png}",
              highlight=False)


def _env(lm) -> dict:
    from .executors import model_environment

    return model_environment(lm)


def _execute(plan, executor: str, ray_address: Optional[str], workers: Optional[int], quiet: bool):
    """Run a sweep plan locally or on Ray; the store and resume work the same either way."""
    import transformers

    from .executors import execute

    transformers.utils.logging.disable_progress_bar()  # qloc shows its own progress
    if executor == "local" and not quiet:
        err.print(f"loading {escape(plan.model.name)} ...", highlight=False)
    return execute(plan, executor, ray_address=ray_address, workers=workers, quiet=quiet)


def _print_cloze_summary(frame, summary) -> None:
    if frame is None or frame.empty:
        out.print("no queries scored")
    else:
        table = Table("fact", "prompt", "answer", "prob", "rank", "top token")
        for r in frame.head(40).itertuples():
            table.add_row(r.fact_id, r.prompt, r.answer, f"{r.prob:.4f}", str(r.rank), repr(r.top_token))
        out.print(table)
        out.print(
            f"{len(frame)} queries of {frame['fact_id'].nunique()} facts: top-1 {100 * (frame['rank'] == 0).mean():.1f}%, "
            f"mean P(answer) {frame['prob'].mean():.4f}",
            highlight=False,
        )
    out.print(f"facts: {summary.describe()}", highlight=False)


@app.command()
def attribute(
    prompt: Annotated[str, typer.Option(help="The cloze prompt (text before the answer).")],
    answer: Annotated[str, typer.Option(help="The answer (a leading space is added).")],
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="ig, amig or sig (METHODS.md section 3).")] = "ig",
    steps: StepsOpt = 20,
    rule: RuleOpt = "right",
    answer_tokens: AnswerTokensOpt = "first",
    threshold: ThresholdOpt = 0.2,
    top_k: TopKOpt = None,
    top: Annotated[int, typer.Option(help="How many top neurons to print.")] = 10,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the float32 [num_layers, d_ff] scores as .npy.")] = None,
    max_batch_rows: MaxRowsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Attribution scores of every knowledge neuron for one query: top neurons, KN set and the
    per-layer completeness residuals."""
    import warnings

    import numpy as np

    from .attribution import attribute as attribute_scores
    from .outputs import check_writable

    if out_file is not None:
        check_writable(out_file.parent, "the scores")  # before the attribution, not after it
    lm = _load(model, device, dtype, quiet or json_out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = attribute_scores(lm, prompt, answer, method, steps=steps, rule=rule, answer_tokens=answer_tokens,
                                  max_batch_rows=max_batch_rows)
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            err.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(out_file, result.scores.numpy().astype(np.float32))
    kn = result.kn_set(threshold, top_k)
    residual = result.completeness_residual.max(0).values
    if json_out:
        payload = {
            "model": model, "prompt": prompt, "answer": answer, **result.params,
            "answer_tokens": result.answer_tokens, "shape": list(result.scores.shape),
            "f_input": result.f_input.tolist(), "f_baseline": result.f_baseline.tolist(),
            "completeness_residual": result.completeness_residual.tolist(),
            "top": [{"layer": l, "neuron": i, "score": v} for l, i, v in result.top(top)],
            "kn_set": [list(u) for u in kn], "out": str(out_file) if out_file else None,
        }
        out.print_json(json.dumps(payload))
        return
    table = Table("rank", "layer", "neuron", "score", title=f"top {top} neurons ({method}, {steps} steps, {rule} rule)")
    for rank, (layer, neuron, value) in enumerate(result.top(top)):
        table.add_row(str(rank), str(layer), str(neuron), f"{value:.4g}")
    out.print(table)
    out.print(f"KN set ({'top ' + str(top_k) if top_k else f'score >= {threshold} x max'}): {len(kn)} neurons "
              + ", ".join(f"L{l}.{i}" for l, i in kn[:30]) + (" ..." if len(kn) > 30 else ""), highlight=False)
    title = "completeness per layer (mean over answer tokens; residual: worst token)"
    if method == "sig":
        title += "; SIG scores are normalised per token path, the residual is of the raw per-path integrals summed"
    layers = Table("layer", "sum of scores", "F(input) - F(baseline)", "residual", title=title)
    sums = result.scores.sum(1)
    deltas = (result.f_input[:, None] - result.f_baseline).mean(0)
    for layer in range(result.scores.shape[0]):
        delta = float(deltas[layer])
        layers.add_row(str(layer), f"{float(sums[layer]):.4g}", f"{delta:.4g}", f"{float(residual[layer]):.3g}")
    out.print(layers)
    out.print(f"F(input) = {', '.join(f'{v:.4f}' for v in result.f_input.tolist())} for answer tokens {result.answer_tokens}"
              + (f"; scores written to {out_file}" if out_file else ""), highlight=False)


@app.command()
def localize(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory (created, or resumed).")],
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="Comma-separated attribution methods: ig, amig, sig.")] = "ig,amig,sig",
    steps: StepsOpt = 20,
    rule: RuleOpt = "right",
    answer_tokens: AnswerTokensOpt = "first",
    threshold: ThresholdOpt = 0.2,
    top_k: TopKOpt = None,
    save_scores: Annotated[bool, typer.Option("--save-scores", help="Also store dense scores (fp16, compressed).")] = False,
    data: DataOpt = None,
    relations: RelationsOpt = None,
    facts_per_relation: PerRelationOpt = 1,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    query_filter: QueryFilterOpt = "mask_final",
    max_batch_rows: MaxRowsOpt = None,
    known: KnownOpt = "all",
    census_dir: CensusDirOpt = None,
    known_pool: KnownPoolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The localization sweep: KN sets of every usable query of every sampled fact, with each
    method (resumable; one transaction per fact). The default samples 1 fact per relation; with
    --known K, only among the facts the model knows (a census comes first)."""
    from .census import parse_known
    from .executors import ModelSpec, SweepPlan
    from .localize import STAGE, LocalizeConfig, localize_work
    from .store import RunStore

    config = LocalizeConfig(methods=tuple(m.strip() for m in methods.split(",") if m.strip()), steps=steps, rule=rule,
                            answer_tokens=answer_tokens, threshold=threshold, top_k=top_k, save_scores=save_scores)
    known_k = parse_known(known)
    params = {"model": model, "dtype": dtype, **_sampling_params(data, relations, facts_per_relation, limit, seed, query_filter),
              **config.params()}
    if known_k is None:
        if census_dir is not None or known_pool is not None:
            raise QlocError("--census and --known-pool choose the census of --known; "
                            "give --known K with them")
        _, selected = _select(data, relations, facts_per_relation, limit, seed, query_filter, quiet)
    else:
        # Without --known the parameters stay as before, so runs made before --known resume.
        params.update(known=known_k, known_pool=known_pool)
        RunStore.check_stage(run_dir, STAGE, params)  # refuse another localize run before the census
        selected = _select_known(known_k, census_dir, known_pool, run_dir, model, device, executor,
                                 ray_address, workers, data, relations, facts_per_relation, limit, seed,
                                 query_filter, quiet)
    plan = SweepPlan(run_dir, STAGE, params, selected, partial(localize_work, config=config, max_batch_rows=max_batch_rows),
                     ModelSpec(model, device, dtype), f"localize {model}")
    summary = _execute(plan, executor, ray_address, workers, quiet)
    out.print(f"facts: {summary.describe()}; results in {run_dir}", highlight=False)


@app.command()
def consistency(
    run_dirs: Annotated[list[Path], typer.Option("--run-dir", help="A localize run; repeat for several models.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where tables/ and figures/ go (default: the first run).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Classify by strict CS (intersection / union).")] = False,
) -> None:
    """KN-consistency scores, KC/KI classes (static 0.1 and Otsu), Welch's t-test, Table 1 and
    Figures 3/7/8/9 from one or more localize runs."""
    from .consistency import write_consistency_report

    written = write_consistency_report(run_dirs, out_dir or run_dirs[0], "cs_strict" if strict else "cs_relaxed")
    table = (written["table1"].with_suffix(".md")).read_text()
    out.print(table, highlight=False, soft_wrap=True)
    for name, path in written.items():
        out.print(f"{name}: {path}", highlight=False)


@dataclass
class LocalizedRun:
    params: dict
    method: str
    knowledge: dict
    dataset: list
    facts: list
    device: str

    @property
    def model(self):
        from .executors import ModelSpec

        return ModelSpec(self.params["model"], self.device, self.params["dtype"])

    def first_facts(self, limit: Optional[int], seed: int) -> list:
        """The first ``limit`` facts of the run in one seeded order (all with None): a prefix of a
        fixed order, so that a larger limit extends a study's run instead of starting another."""
        import random

        if limit is not None and limit < 1:
            raise QlocError(f"--limit {limit}: must be at least 1")
        facts = list(self.facts)
        random.Random(seed).shuffle(facts)
        return facts[:limit] if limit is not None else facts


def _localized_run(run_dir: Path, method: Optional[str], device: str, quiet: bool) -> LocalizedRun:
    """What the experiments on a localize run need: its KN sets for ``method`` (default: the
    run's first), its facts within the full dataset, and which model to load."""
    from .knsets import knowledge_from_store
    from .localize import STAGE
    from .pararel import load_pararel
    from .store import RunStore

    with RunStore.open_existing(run_dir) as store:
        localized = store.params(STAGE)
        kn_frame, cas_frame = store.frame("kn_sets"), store.frame("cas_sets")
    method = method or localized["methods"][0]
    knowledge = knowledge_from_store(kn_frame, cas_frame, method)
    data = None if localized["data"] == "bundled" else localized["data"]
    dataset = load_pararel(data, query_filter=localized["query_filter"]).facts
    # Each fact's queries are those the run localized, in its query order: with --known only the
    # known ones, so query 0 (the Self set, the edited query) is a known query.
    localized_queries = {
        fact_id: tuple(group.sort_values("query_index")["prompt"])
        for fact_id, group in kn_frame[kn_frame["method"] == method].groupby("fact_id", sort=False)
    }
    facts = [replace(f, queries=localized_queries[f.id]) for f in dataset if f.id in knowledge]
    return LocalizedRun(localized, method, knowledge, dataset, facts, device)


@app.command()
def mapping(
    run_dir: LocalizedRunOpt,
    method: KnMethodOpt = None,
    shared_filter: SharedFilterOpt = "0.1",
    limit: FactLimitOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The query-KN mapping experiment (Figure 4): suppress (x0) and enhance (x2) the Self, Union,
    Intersection, Refine and Unrelated sets of every query; dProb per set and class (mean, median,
    bootstrap 95 % interval)."""
    from .outputs import markdown_table, save_figure, write_table
    from .executors import SweepPlan
    from .mapping import MappingConfig, mapping_figure, mapping_table, mapping_work
    from .store import RunStore

    run = _localized_run(run_dir, method, device, quiet)
    config = MappingConfig(method=run.method, seed=seed, shared_filter=_shared_filter(shared_filter))
    params = {"model": run.params["model"], "dtype": run.params["dtype"], **config.params()}
    work = partial(mapping_work, config=config, knowledge=run.knowledge)
    plan = SweepPlan(run_dir, config.stage, params, run.first_facts(limit, seed), work, run.model, f"mapping {run.method}")
    summary = _execute(plan, executor, ray_address, workers, quiet)
    with RunStore.open_existing(run_dir) as store:
        table = mapping_table(store.frame("mapping"))
    csv = write_table(table, run_dir / "tables", "fig4_mapping")
    png = save_figure(mapping_figure(table), run_dir / "figures", "fig4_mapping")
    out.print(markdown_table(table), highlight=False, soft_wrap=True)
    out.print(f"facts: {summary.describe()}; "
              f"{csv}, {png}", highlight=False)


@app.command()
def synapses(
    run_dir: LocalizedRunOpt,
    method: KnMethodOpt = None,
    steps: StepsOpt = 20,
    rule: RuleOpt = "right",
    answer_tokens: AnswerTokensOpt = "first",
    threshold: Annotated[float, typer.Option(help="Knowledge synapses: score >= threshold * max score.")] = 0.3,
    limit: FactLimitOpt = None,
    heatmaps: Annotated[int, typer.Option(help="Facts drawn as KN-activation heatmaps (Figures 5, 10).")] = 3,
    seed: SeedOpt = 0,
    max_batch_rows: MaxRowsOpt = None,
    device: DeviceOpt = "auto",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Knowledge synapses: attribute every attention probability of every query (integrated
    gradients), take those above threshold x max, suppress (x0) and enhance (x2) them, and measure
    the change of the query's KN activations, of neighbour KNs, of random non-KNs and of the
    answer's probability (Figures 5, 6, 10, 11; Table 6). Resumable per fact."""
    from .executors import SweepPlan
    from .outputs import markdown_table
    from .store import RunStore
    from .synapses import SynapseConfig, cost_table, effects_table, synapse_work, write_synapse_report

    run = _localized_run(run_dir, method, device, quiet)
    config = SynapseConfig(method=run.method, steps=steps, rule=rule, answer_tokens=answer_tokens, threshold=threshold, seed=seed)
    facts = run.first_facts(limit, seed)
    params = {"model": run.params["model"], "dtype": run.params["dtype"], **config.params()}
    build = partial(synapse_work, config=config, knowledge=run.knowledge, max_batch_rows=max_batch_rows)
    summary = _execute(SweepPlan(run_dir, config.stage, params, facts, build, run.model, f"synapses {run.method}"),
                       executor, ray_address, workers, quiet)
    with RunStore.open_existing(run_dir) as store:
        if "synapse_effects" not in store.tables():
            raise QlocError(f"no fact of {str(run_dir)!r} could be processed ({dict(summary.skip_reasons)})")
        found, effects = store.frame("synapses"), store.frame("synapse_effects")
    written = write_synapse_report(found, effects, run_dir, heatmaps)
    for measure in ("signed", "magnitude"):
        out.print(f"dKN measure: {measure}", highlight=False)
        out.print(markdown_table(effects_table(effects, measure)), highlight=False, soft_wrap=True)
    out.print(markdown_table(cost_table(effects)), highlight=False, soft_wrap=True)
    for name, path in written.items():
        out.print(f"{name}: {path}", highlight=False)
    out.print(f"facts: {summary.describe()}", highlight=False)


@app.command()
def edit(
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="A localize run: its model, facts and KN sets are used.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="erase or update (METHODS.md section 5); default erase, or update with --new.")] = None,
    sets: Annotated[str, typer.Option(help="KN sets to edit through: self, union, cas.")] = "self,union,cas",
    method: KnMethodOpt = None,
    lambda1: Annotated[float, typer.Option(help="Weight of the old answer's removal (Dai et al.: 1).")] = 1.0,
    lambda2: Annotated[float, typer.Option(help="Weight of the new answer's addition (Dai et al.: 8).")] = 8.0,
    edit_sign: Annotated[str, typer.Option(
        help="activation: each KN's change times the sign of its activation (gated MLPs have negative ones); "
        "none: the literal equation.")] = "activation",
    shared_filter: SharedFilterOpt = "0.1",
    limit: FactLimitOpt = None,
    sequential: Annotated[int, typer.Option(help="Edit N sampled facts one after another (Table 7); 0: one at a time.")] = 0,
    seeds: Annotated[int, typer.Option(help="Sequential editing: repeats with different samples.")] = 5,
    case: Annotated[Optional[str], typer.Option(help="Case study (Table 8): edit the fact this query asks, print greedy continuations.")] = None,
    new: Annotated[Optional[str], typer.Option(help="Case study: the new object (omit to erase).")] = None,
    answer: Annotated[Optional[str], typer.Option(help="Case study: the current object (default: ParaRel's, if the query is in it).")] = None,
    model: ModelOpt = "smollm2-135m",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Knowledge erasure or update through KN sets: Rel, Gen, Loc, Avg and perplexity change per
    fact (resumable), then Table 2 (Self, Union) and Table 3 (with CAS) for KC and KI facts.
    With --sequential N: N facts edited without restoring in between, --seeds times (Table 7)."""
    from .outputs import markdown_table, write_table
    from .edit_study import EditConfig, SequentialUnit, edit_table, edit_work, sequential_table, sequential_work
    from .executors import SweepPlan
    from .store import RunStore
    from .wikitext import wikitext_passages

    mode = mode or ("update" if new is not None else "erase")
    if case is not None:
        if (mode == "update") != (new is not None):
            raise QlocError("a --case update needs --new (the object to write); an erasure takes none")
        if sequential:
            raise QlocError("--case edits one fact; it does not combine with --sequential")
        _case_study(case, answer, new, model, method or "ig", sets.split(",")[0], edit_sign, run_dir, device, quiet)
        return
    if run_dir is None:
        raise QlocError("--run-dir (a localize run) is needed, except for a --case study")
    if answer is not None or new is not None:
        raise QlocError("--answer and --new are for --case studies; a run's updates draw o' from the relation")
    run = _localized_run(run_dir, method, device, quiet)
    config = EditConfig(mode=mode, sets=tuple(s.strip() for s in sets.split(",") if s.strip()), method=run.method,
                        lambda1=lambda1, lambda2=lambda2, seed=seed, edit_sign=edit_sign,
                        shared_filter=_shared_filter(shared_filter))
    localized, knowledge, dataset, facts = run.params, run.knowledge, run.dataset, run.facts
    passages = wikitext_passages(config.ppl_passages, seed=seed)
    params = {"model": localized["model"], "dtype": localized["dtype"], **config.params()}
    tables = run_dir / "tables"
    if sequential > 0:
        stage = f"sequential-{config.mode}-{config.method}"
        # Seed-major, so that an interrupted run has every KN set for the seeds it finished.
        units = [SequentialUnit(name, repeat) for repeat in range(seeds) for name in config.sets]
        build = partial(sequential_work, config=config, knowledge=knowledge, dataset=dataset, facts=facts, count=sequential,
                        passages=passages)
        plan = SweepPlan(run_dir, stage, {**params, "sequential": sequential, "seeds": seeds}, units, build, run.model,
                         f"sequential {mode}")
        _execute(plan, executor, ray_address, workers, quiet)
        with RunStore.open_existing(run_dir) as store:
            table = sequential_table(store.frame("sequential"))
        write_table(table, tables, "table7")
        out.print(markdown_table(table), highlight=False, soft_wrap=True)
        return
    build = partial(edit_work, config=config, knowledge=knowledge, dataset=dataset, passages=passages)
    summary = _execute(SweepPlan(run_dir, config.stage, params, run.first_facts(limit, seed), build, run.model,
                                 f"{mode} via {','.join(config.sets)}"),
                       executor, ray_address, workers, quiet)
    with RunStore.open_existing(run_dir) as store:
        edits = store.frame("edits")
    for name, chosen in (("table2", ("self", "union")), ("table3", ("self", "union", "cas"))):
        write_table(edit_table(edits, chosen), tables, name)
    out.print(markdown_table(edit_table(edits, config.sets)), highlight=False, soft_wrap=True)
    out.print(f"facts: {summary.describe()}; "
              f"tables in {tables}", highlight=False)


def _case_study(query: str, answer: Optional[str], new: Optional[str], model: str, method: str, set_name: str,
                edit_sign: str, run_dir: Optional[Path], device: str, quiet: bool) -> None:
    from .outputs import write_table
    from .edit_study import case_study
    from .pararel import causal_prompt, load_pararel

    dtype = "float32"
    if run_dir is not None and (run_dir / "qloc.sqlite").exists():
        from .localize import STAGE
        from .store import RunStore

        with RunStore.open_existing(run_dir) as store:  # the case is about the run's model
            localized = store.params(STAGE)
        model, dtype = localized["model"], localized["dtype"]
    prompt = causal_prompt(query) or query.strip()
    fact = next((f for f in load_pararel().facts if prompt in f.queries), None)
    if answer is None and fact is None:
        raise QlocError(f"--case {query!r} is not a ParaRel query: give its current object with --answer")
    answer = answer or fact.object
    queries = [prompt] + ([q for q in fact.queries if q != prompt] if fact else [])
    lm = _load(model, device, dtype, quiet)
    table = case_study(lm, queries, answer, new, method, set_name, edit_sign=edit_sign)
    if run_dir is not None:
        write_table(table, run_dir / "tables", "table8")
    view = Table("", "prompt", "before", "after", title=f"{answer!r} -> {new!r} via {set_name} ({method}, {table.kn_size[0]} KNs)")
    for row in table.itertuples():
        view.add_row(row.role, row.prompt, row.before, row.after)
    out.print(view)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Option("--run-dir", help="A run directory, or a directory with tables/ and figures/; repeat for several.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="The HTML file (default: report.html in the first directory); the Markdown goes beside it.")] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the HTML file in the default browser (where there is a display).")] = False,
) -> None:
    """One self-contained HTML report (figures embedded; opens from disk): what the runs found beside
    the paper, every table beside its figure, a per-fact explorer, and each run's parameters,
    environment and skip counts; plus the findings and tables as Markdown."""
    from .report import open_in_browser, write_report

    written = write_report(run_dirs, out_file or run_dirs[0] / "report.html")
    for name, path in written.items():
        out.print(f"{name}: {path}", highlight=False)
    if open_page and not open_in_browser(written["html"]):
        out.print(f"No display or browser here: open {written['html']} on a machine with one.", highlight=False)


DEMO_KNOWN_POOL = 64
"""Facts per relation that ``demo`` and ``reproduce --scale sample`` census for --known."""
SCALES = {
    # sample: a few facts through every stage, within an hour on 2 CPU cores for a 135M model.
    # With --known, the facts come from a census of DEMO_KNOWN_POOL facts per relation, not of all of ParaRel.
    "sample": {"facts_per_relation": 1, "limit": 4, "sequential": 4, "seeds": 2, "synapse_facts": 2,
               "known_pool": DEMO_KNOWN_POOL},
    # full: every fact of ParaRel with >= 2 usable queries, the paper's sequential setting.
    "full": {"facts_per_relation": None, "limit": None, "sequential": 20, "seeds": 5, "synapse_facts": None,
             "known_pool": None},
}


@app.command()
def reproduce(
    model: ModelOpt = "smollm2-135m",
    scale: Annotated[str, typer.Option(help="sample (4 facts, within an hour on 2 CPU cores for a 135M model) or full (all of ParaRel).")] = "sample",
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Default: runs/<model>-<scale>.")] = None,
    facts: Annotated[Optional[int], typer.Option("--facts", help="Override the scale's number of facts.")] = None,
    method: Annotated[str, typer.Option(help="Whose KN sets the editing, mapping and synapse experiments use.")] = "amig",
    known: KnownOpt = "1",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The whole study with the paper's settings: localize (IG, AMIG, SIG), KN consistency, erasure
    and update through Self/Union/CAS sets, sequential editing, query-KN mapping, knowledge synapses,
    and one report, on facts the model knows (--known 1; the sample scale censuses 64 facts per
    relation for them). Every stage is resumable: rerun the same command after an interruption."""
    if scale not in SCALES:
        raise QlocError(f"--scale {scale!r}: choose {' or '.join(SCALES)}")
    settings = dict(SCALES[scale], **({"limit": facts} if facts is not None else {}))
    run_dir = run_dir or Path("runs") / f"{Path(model).name.removesuffix('.gguf')}-{scale}"
    sweep = {"device": device, "executor": executor, "ray_address": ray_address, "workers": workers, "quiet": quiet}
    steps = [
        ("localize (IG, AMIG, SIG)", lambda: localize(
            run_dir=run_dir, model=model, methods="ig,amig,sig", steps=20, rule="right", answer_tokens="first", threshold=0.2,
            top_k=None, save_scores=False, data=None, relations=None, facts_per_relation=settings["facts_per_relation"],
            limit=settings["limit"], seed=seed, query_filter="mask_final", max_batch_rows=None, dtype=dtype,
            known=known, census_dir=None, known_pool=_pool_for(known, settings["known_pool"]), **sweep)),
        ("KN consistency", lambda: consistency(run_dirs=[run_dir], out_dir=run_dir, strict=False)),
        ("erasure", lambda: edit(run_dir=run_dir, mode="erase", method=method, seed=seed, **_EDIT_DEFAULTS, **sweep)),
        ("update", lambda: edit(run_dir=run_dir, mode="update", method=method, seed=seed, **_EDIT_DEFAULTS, **sweep)),
        ("sequential update", lambda: edit(run_dir=run_dir, mode="update", method=method, seed=seed,
                                           **dict(_EDIT_DEFAULTS, sequential=settings["sequential"], seeds=settings["seeds"]), **sweep)),
        ("query-KN mapping", lambda: mapping(run_dir=run_dir, method=method, shared_filter="0.1", seed=seed, **sweep)),
        ("knowledge synapses", lambda: synapses(
            run_dir=run_dir, method=method, steps=20, rule="right", answer_tokens="first", threshold=0.3,
            limit=settings["synapse_facts"], heatmaps=3, seed=seed, max_batch_rows=None, **sweep)),
        ("report", lambda: report(run_dirs=[run_dir], out_file=None)),
    ]
    for number, (name, run_step) in enumerate(steps, 1):
        err.rule(f"[{number}/{len(steps)}] {name}")
        run_step()


def _pool_for(known: str, pool: Optional[int]) -> Optional[int]:
    """The census pool of a --known filter; none without one."""
    from .census import parse_known

    return None if parse_known(known) is None else pool


_EDIT_DEFAULTS = {"sets": "self,union,cas", "lambda1": 1.0, "lambda2": 8.0, "edit_sign": "activation", "shared_filter": "0.1",
                  "sequential": 0, "seeds": 5, "case": None, "new": None, "answer": None, "model": "smollm2-135m"}


@app.command()
def demo(
    model: ModelOpt = "smollm2-135m",
    run_dir: Annotated[Path, typer.Option("--run-dir")] = Path("qloc-demo"),
    facts: Annotated[int, typer.Option("--facts", help="How many facts (sampled 1 per relation).")] = 8,
    methods: Annotated[str, typer.Option(help="Attribution methods.")] = "ig,amig",
    known: KnownOpt = "1",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """The main job, small: localize knowledge neurons of a few sampled ParaRel facts that the
    model knows (--known, from a census of 64 facts per relation) on the default model and report
    their KN consistency (Table 1 and figures). Resumable."""
    localize(run_dir=run_dir, model=model, methods=methods, steps=20, rule="right", answer_tokens="first", threshold=0.2,
             top_k=None, save_scores=False, data=None, relations=None, facts_per_relation=1, limit=facts, seed=seed,
             query_filter="mask_final", max_batch_rows=None, known=known, census_dir=None,
             known_pool=_pool_for(known, DEMO_KNOWN_POOL), device=device, dtype="float32", quiet=quiet)
    consistency(run_dirs=[run_dir], out_dir=None, strict=False)
    out.print(f"KN sets: qloc.RunStore.open_existing({str(run_dir)!r}).frame('kn_sets'); full study: qloc localize --help",
              highlight=False)


if __name__ == "__main__":
    main()
