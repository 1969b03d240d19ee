"""The ``qloc`` command line. Every command is a request dataclass and what runs it: the studies'
commands come from the registry (:data:`qloc.studies.STUDIES`), the others from
:mod:`qloc.commands`. A request's settings are the command's options (:mod:`qloc.settings`), and
an error about a setting names its flag here."""

from __future__ import annotations

import errno
import inspect
import io
import json
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import transformers
import typer
from rich.console import Console

from . import commands
from .data.selection import Selection
from .engine.models import DEFAULT_DEVICE, DEFAULT_MODEL
from .errors import NOTE, ConfigError, QlocError
from .report import write_report
from .runs.executors import Execution
from .runs.outputs import markdown_table
from .settings import SHORT_FLAGS, check_numbers, flag_of, setting
from .studies import STUDIES
from .studies.consistency import ConsistencyRequest
from .studies.localize import SAMPLE_KNOWN_POOL, LocalizeConfig, LocalizeRequest
from .studies.registry import OptionSpec, Outcome, Reproduction, Study, build_request, option_specs
from .terminal import labelled, plain

app = typer.Typer(
    help="Knowledge localization in language models: knowledge neurons, KN consistency, query localization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
log = logging.getLogger("qloc")
INTERRUPTED = "interrupted"
RESUMABLE = "; finished units are stored and the same command resumes"
"""Added to INTERRUPTED for the commands that store their units as they finish."""


def parse_known(value: str | int) -> int | None:
    """``--known``: an int K >= 1 (known at top-K), or ``all`` (None: no filter)."""
    text = str(value).strip()
    if text.lower() == "all":
        return None
    k = int(text) if text.isdigit() else 0
    if k < 1:
        raise QlocError(f"--known {value!r}: give an integer K >= 1 (answer ranked below K) or 'all'")
    return k


def share_parser(flag: str) -> Callable[[str], float | None]:
    """The parser of a share setting (``--shared-filter``, ``--activity-filter``): a share such as
    0.1, or ``off`` (None)."""

    def parse(value: str) -> float | None:
        if value.strip().lower() == "off":
            return None
        try:
            return float(value)
        except ValueError:
            raise QlocError(f"{flag} {value!r}: a share such as 0.1, or off") from None

    return parse


WORD_PARSERS: dict[str, Callable[[str], Any]] = {
    "known": parse_known,
    "shared_filter": share_parser("--shared-filter"),
    "activity_filter": share_parser("--activity-filter"),
}
"""Settings that take a word for None on the command line, and how their text is read."""


def _is_text_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is tuple


def _parameter(spec: OptionSpec) -> inspect.Parameter:
    """The typer parameter of a setting; lists of words and None-able settings with a word take text."""
    names = [spec.flag, *([SHORT_FLAGS[spec.name]] if spec.name in SHORT_FLAGS else [])]
    annotation, default = spec.annotation, spec.default
    if spec.word is not None:
        annotation, default = str, spec.word if default is None else str(default)
    elif _is_text_list(annotation):
        annotation, default = str, ",".join(default)
    elif spec.required:
        default = inspect.Parameter.empty
    option = typer.Option(*names, help=spec.help)
    return inspect.Parameter(
        spec.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def _value(spec: OptionSpec, given: Any) -> Any:
    if spec.word is not None:
        return WORD_PARSERS[spec.name](given)
    if _is_text_list(spec.annotation):
        return tuple(part.strip() for part in given.split(",") if part.strip())
    return given


def _quiet(request: Any) -> bool:
    execution = getattr(request, "execution", None)
    flags = (
        getattr(request, "quiet", False),
        getattr(request, "json_out", False),
        getattr(execution, "quiet", False),
    )
    return any(flags)


def command(request_type: type[Any], handler: Callable[[Any], None], summary: str) -> Callable[..., None]:
    """A typer command whose options are ``request_type``'s settings and which hands the request to
    ``handler``."""
    specs = option_specs(request_type)

    def run_command(**given: Any) -> None:
        values = {spec.name: _value(spec, given[spec.name]) for spec in specs}
        check_numbers(values)
        request = build_request(request_type, values)
        log.setLevel(NOTE if _quiet(request) else logging.INFO)
        handler(request)

    run_command.__signature__ = inspect.Signature([_parameter(spec) for spec in specs])  # type: ignore[attr-defined]
    run_command.__doc__ = " ".join(summary.split())
    return run_command


def show(outcome: Outcome, as_json: bool = False) -> None:
    if as_json and outcome.json is not None:
        out.print_json(json.dumps(outcome.json))
    elif as_json and outcome.json_lines is not None:
        for record in outcome.json_lines:
            out.print(json.dumps(record, ensure_ascii=False), markup=False, highlight=False, soft_wrap=True)
    else:
        for item in outcome.shown:
            text = markdown_table(item, escaped=False) if isinstance(item, pd.DataFrame) else item
            out.print(plain(text), highlight=False, soft_wrap=True)


def run_study(study: Study, request: Any) -> None:
    show(study.run(request), getattr(request, "json_out", False))


@dataclass(frozen=True)
class StudyCommand:
    """What a study's command runs: the study on the request, its outcome shown."""

    study: Study

    def __call__(self, request: Any) -> None:
        run_study(self.study, request)


def reproduce(plan: Reproduction) -> None:
    """The whole study with the paper's settings: localize (IG, AMIG, SIG), KN consistency, erasure
    and update through Self/Union/CAS sets, sequential editing, query-KN mapping, knowledge synapses,
    and one report, on facts the model knows (--known 1; the sample scale censuses 64 facts per
    relation for them). Every stage is resumable: rerun the same command after an interruption."""
    steps = [
        (title, study, request)
        for study in STUDIES
        if study.reproduce
        for title, request in study.reproduce(plan)
    ]
    total = len(steps) + 1
    for number, (title, study, request) in enumerate(steps, 1):
        err.rule(f"[{number}/{total}] {title}")
        run_study(study, request)
    err.rule(f"[{total}/{total}] report")
    for name, path in write_report([plan.directory], plan.directory / "report.html").items():
        out.print(plain(f"{name}: {path}"), highlight=False)


REPRODUCE_EXAMPLES = (
    "qloc reproduce --model smollm2-135m --scale sample       "
    "# every stage above, then the report; resumable",
)
EXECUTOR_EXAMPLE = (
    "qloc localize ... --executor ray --workers 2             "
    "# any sweep on Ray: one model replica per GPU or CPU core"
)


@dataclass(frozen=True)
class Demo:
    model: str = setting(DEFAULT_MODEL)
    run_dir: Path = setting(Path("qloc-demo"), "Run directory (created, or resumed).")
    facts: int = setting(8, "How many facts (sampled 1 per relation).")
    methods: tuple[str, ...] = setting(("ig", "amig"), "Attribution methods.")
    known: int | None = setting(1, word="all")
    seed: int = setting(0)
    device: str = setting(DEFAULT_DEVICE)
    quiet: bool = setting(False)


def demo(request: Demo) -> None:
    """The main job, small: localize knowledge neurons of a few sampled ParaRel facts that the
    model knows (--known, from a census of 64 facts per relation) on the default model and report
    their KN consistency (Table 1 and figures, and the HTML report with the findings beside the
    paper's cells). Resumable."""
    localize = LocalizeRequest(
        request.run_dir,
        request.model,
        LocalizeConfig(methods=request.methods),
        Selection(facts_per_relation=1, limit=request.facts, seed=request.seed),
        known=request.known,
        known_pool=SAMPLE_KNOWN_POOL if request.known is not None else None,
        device=request.device,
        execution=Execution(quiet=request.quiet),
    )
    run_study(STUDIES_BY_NAME["localize"], localize)
    run_study(STUDIES_BY_NAME["consistency"], ConsistencyRequest([request.run_dir]))
    kn_sets = f"qloc.RunStore.open_existing({str(request.run_dir)!r}).frame('kn_sets')"
    out.print(plain(f"KN sets: {kn_sets}; full study: qloc localize --help"), highlight=False)
    written = write_report([request.run_dir], request.run_dir / "report.html")
    out.print(
        plain(
            f"Report (open in a browser; what the run found beside the paper comes first): {written['html']}"
        ),
        highlight=False,
    )


STUDIES_BY_NAME = {study.name: study for study in STUDIES}


@dataclass(frozen=True)
class Command:
    """A ``qloc`` command: its request dataclass, what runs a request, its help and README lines."""

    name: str
    request: type[Any]
    handler: Callable[[Any], None]
    summary: str
    examples: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, name: str, request: type[Any], handler: Callable[[Any], None], examples: tuple[str, ...] = ()
    ) -> Command:
        """A command whose help is its handler's docstring."""
        return cls(name, request, handler, inspect.getdoc(handler) or "", examples)


COMMANDS = (
    Command.of("models", commands.Models, commands.models, commands.MODELS_EXAMPLES),
    Command.of("facts", commands.Facts, commands.facts, commands.FACTS_EXAMPLES),
    Command.of("attribute", commands.Attribute, commands.attribute_query, commands.ATTRIBUTE_EXAMPLES),
    *(Command(s.name, s.request, StudyCommand(s), s.summary, s.examples) for s in STUDIES),
    Command.of("report", commands.Report, commands.report, commands.REPORT_EXAMPLES),
    Command.of("reproduce", Reproduction, reproduce, REPRODUCE_EXAMPLES),
    Command.of("demo", Demo, demo),
)
for entry in COMMANDS:
    app.command(entry.name)(command(entry.request, entry.handler, entry.summary))
FLAGS = {spec.name: spec.flag for entry in COMMANDS for spec in option_specs(entry.request)}
"""Setting name -> its flag, for errors that name a setting."""


def readme_commands() -> str:
    """The README's list of commands, one example a line, from every command's examples."""
    return "\n".join([line for entry in COMMANDS for line in entry.examples] + [EXECUTOR_EXAMPLE])


class _Console(logging.Handler):
    """qloc's log as the command line shows it: warnings marked, everything else as it is."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            err.print(labelled("warning:", "yellow", text), highlight=False, soft_wrap=True)
        else:
            err.print(plain(text), highlight=False)


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, never a bare traceback."""
    transformers.utils.logging.disable_progress_bar()  # qloc shows its own progress
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe whose encoding lacks a character of the data (PYTHONIOENCODING=ascii)
        # shows it as an escape rather than failing the command.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    log.handlers, log.propagate = [_Console()], False
    try:
        app()
    except QlocError as exc:
        # A setting is named by its flag.
        message = (
            exc.describe(lambda name: FLAGS.get(name) or flag_of(name))
            if isinstance(exc, ConfigError)
            else str(exc)
        )
        err.print(labelled("error:", "bold red", message), highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        # A full disk can strike in any library's write (torch, matplotlib, SQLite's journal); qloc's
        # own outputs say so themselves (qloc.runs.outputs).
        if exc.errno != errno.ENOSPC:
            raise
        err.print(labelled("error:", "bold red", f"disk full at {exc.filename!r}"), highlight=False)
        sys.exit(2)
    except SystemExit as exc:
        # Typer turns Ctrl-C into exit status 130 before it could reach an except KeyboardInterrupt.
        if exc.code == 130:
            err.print(_interrupted(), highlight=False)
        raise
    except KeyboardInterrupt:
        err.print(_interrupted(), highlight=False)
        sys.exit(130)


def _interrupted() -> str:
    """The line a Ctrl-C ends with: whether what finished is kept depends on the command."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    sweeps = {study.name for study in STUDIES} | {"reproduce", "demo"}
    return INTERRUPTED + (RESUMABLE if command in sweeps else "")


if __name__ == "__main__":
    main()
