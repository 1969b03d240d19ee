"""What a study declares, so that the command line, ``qloc reproduce``, the report and the README
derive from one registry (``STUDIES`` in :mod:`qloc.studies`) instead of repeating the study.

A study is one module of this package and one :class:`Study` entry. The entry names:

- its request dataclass: everything a run of the study takes. The request's fields, and those of
  the dataclasses it nests (the study's config, the fact selection, where the sweep executes), are
  the command's options with their defaults and help (:mod:`qloc.settings`); :func:`option_specs`
  flattens them and :func:`build_request` builds a request back from flat values;
- its ``run`` function: the sweep (stage name, units, work function) and the tables and figures
  it writes, returning an :class:`Outcome` to show;
- its report panels (tables and figures with their titles, in the paper's order), their captions
  and the rules that check its claims against the paper (its ``*_claims`` module), the command
  lines the README lists, and the steps it adds to ``qloc reproduce``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.models import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL
from ..errors import ConfigError
from ..runs.executors import Execution
from ..settings import flag_of, help_of, setting
from .claims import ClaimRules


@dataclass(frozen=True)
class Panel:
    """Tables and figures the report shows together under a title. ``order`` places the panel in
    the paper's order among every study's panels; a name holding ``{method}`` makes one panel per
    attribution method found; a figure name ending in ``*`` takes every figure it starts."""

    order: int
    title: str
    tables: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The panel's first table or figure name, by which the report finds its caption."""
        return (self.tables + self.figures)[0]

    @property
    def per_method(self) -> bool:
        return any("{method}" in name for name in self.tables + self.figures)

    def for_method(self, method: str) -> Panel:
        def fill(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(name.replace("{method}", method) for name in names)

        title = self.title.replace("{METHOD}", method.upper())
        return Panel(self.order, title, fill(self.tables), fill(self.figures))


Frames = dict[str, pd.DataFrame]
"""The tables a caption reads, by name."""
Caption = str | Callable[[Frames, Panel], str]
"""A panel's caption: a template, where ``{facts}``, ``{queries}``, ``{seeds}`` and ``{passes}`` are
the values of those count columns in the panel's first table (:func:`count_text`) and ``{rows}``
its number of rows; or, where it needs more, a function of the tables and the panel."""
COUNT_COLUMNS = ("facts", "queries", "seeds", "passes")


def count_text(frame: pd.DataFrame, column: str) -> str:
    """The values of a count column as text: ``31``, or ``20-200`` where rows differ."""
    if column not in frame or frame[column].dropna().empty:
        return "?"
    low, high = int(frame[column].min()), int(frame[column].max())
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


@dataclass
class Outcome:
    """What a run leaves to show: lines and tables (shown as Markdown), in order, and what the
    command's ``--json`` prints instead (one JSON value, or one per line)."""

    shown: list[str | pd.DataFrame] = field(default_factory=list)
    json: Any = None
    json_lines: list[dict[str, Any]] | None = None


SCALES = ("sample", "full")


@dataclass(frozen=True)
class Reproduction:
    """What ``qloc reproduce`` runs every study with; each study's own settings for a scale live in
    its ``reproduce`` step."""

    model: str = setting(DEFAULT_MODEL)
    scale: str = setting(
        "sample", "sample (4 facts, within an hour on 2 CPU cores for a 135M model) or full (all of ParaRel)."
    )
    run_dir: Path | None = setting(None, "Default: runs/<model>-<scale>.")
    facts: int | None = setting(None, "Override the scale's number of facts.")
    method: str = setting("amig", "Whose KN sets the editing, mapping and synapse experiments use.")
    known: int | None = setting(1, word="all")
    seed: int = setting(0)
    device: str = setting(DEFAULT_DEVICE)
    dtype: str = setting(DEFAULT_DTYPE)
    execution: Execution = setting(factory=Execution)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError.invalid("scale", self.scale, f"choose {' or '.join(SCALES)}")

    @property
    def directory(self) -> Path:
        return self.run_dir or Path("runs") / f"{Path(self.model).name.removesuffix('.gguf')}-{self.scale}"


@dataclass(frozen=True)
class Study:
    """A study's registry entry: ``name``, its command; ``summary``, the command's help (what the
    study computes and writes); the ``request`` dataclass of its settings and the function that
    ``run`` s one; its report ``panels``, their ``captions`` by panel key (:attr:`Panel.key`) and
    the ``claims`` rules that check what it found against the paper; ``examples``, the README's
    lines for it (a command and what it does); and ``reproduce``, the (title, request) steps it
    adds to ``qloc reproduce``."""

    name: str
    summary: str
    request: type[Any]
    run: Callable[[Any], Outcome]
    panels: tuple[Panel, ...] = ()
    captions: Mapping[str, Caption] = field(default_factory=dict)
    claims: type[ClaimRules] | None = None
    examples: tuple[str, ...] = ()
    reproduce: Callable[[Reproduction], list[tuple[str, Any]]] | None = None


@dataclass(frozen=True)
class OptionSpec:
    """One setting of a request as a command-line option: its ``name`` and ``path`` (the field names
    from the request down to it), ``flag`` and ``help``, its type (``annotation``; None-able
    settings with a ``word`` take text on the command line) and ``default`` (``dataclasses.MISSING``
    for a required setting)."""

    name: str
    path: tuple[str, ...]
    flag: str
    help: str
    annotation: Any
    default: Any
    word: str | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _is_request_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def option_specs(request: type[Any], path: tuple[str, ...] = (), defaults: Any = None) -> list[OptionSpec]:
    """Every setting of ``request`` a command offers, nested dataclasses flattened in place; a
    nested dataclass's defaults are those of the request's default instance of it."""
    hints = typing.get_type_hints(request)
    specs: list[OptionSpec] = []
    for f in dataclasses.fields(request):
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if _is_request_group(hints[f.name]):
            specs += option_specs(hints[f.name], (*path, f.name), default)
        elif not f.metadata.get("hidden"):
            word = f.metadata.get("word")
            specs.append(
                OptionSpec(
                    f.name, (*path, f.name), flag_of(f.name, f), help_of(f), hints[f.name], default, word
                )
            )
    names = [s.name for s in specs]
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"{request.__name__} offers {duplicated} twice"
    return specs


def build_request(request: type[Any], values: dict[str, Any]) -> Any:
    """A ``request`` from flat setting values (by name); settings not given keep their defaults."""

    def build(cls: type[Any], defaults: Any) -> Any:
        hints = typing.get_type_hints(cls)
        chosen: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if _is_request_group(hints[f.name]):
                default = getattr(defaults, f.name) if defaults is not None else _default(f)
                chosen[f.name] = build(hints[f.name], default)
            elif f.name in values and not f.metadata.get("hidden"):
                chosen[f.name] = values[f.name]
        return dataclasses.replace(defaults, **chosen) if defaults is not None else cls(**chosen)

    return build(request, None)
