"""Settings: the fields of qloc's request and config dataclasses, with the help text that the
command line shows and the README lists.

A study's request dataclass (:mod:`qloc.studies.registry`) declares every setting a run of it
takes, nesting the dataclasses settings come in (a study's config, the fact selection, where a
sweep executes). Each setting's default lives in its field; :func:`setting` adds its help and,
where it is not ``--`` plus the field's name with dashes, its flag. Fields named as in
:data:`COMMON_HELP` need no help of their own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

COMMON_HELP = {
    "model": "Built-in name (see `qloc models`), .gguf file, local directory or Hugging Face id.",
    "device": "cpu, cuda, cuda:N, auto, or map (one model over several GPUs, accelerate's device_map=auto).",
    "dtype": "Model weights: float32, bfloat16 or float16 (softmax and attribution arithmetic stay fp32).",
    "seed": "Seed for every sampling step.",
    "quiet": "No progress bars.",
    "max_batch_rows": "Rows per forward/backward chunk (default: automatic).",
    "method": "Whose KN sets (default: the run's first method).",
    "steps": "Integration steps m.",
    "rule": "right (the paper's eq. 8), midpoint or gauss (Gauss-Legendre).",
    "answer_tokens": (
        "first: F = P(first answer token), the default; all: average over teacher-forced answer tokens."
    ),
    "known": (
        "Keep the queries whose answer's first token ranks below K (known at top-K) and the facts with "
        ">= 2 of them, then sample; all: no filter."
    ),
    "shared_filter": (
        "Drop KNs held by more than this share of the relation's facts before the experiment "
        "(Dai et al.: 0.1; relations with under 50 facts in the run count over all its facts), or off."
    ),
}
SHORT_FLAGS = {"model": "-m", "quiet": "-q"}
MINIMUMS = {
    "max_batch_rows": 1,
    "batch_size": 1,
    "sequential": 0,
    "seeds": 1,
    "workers": 1,
    "top": 0,
    "show": 0,
}
"""The least value of each count a command takes (the settings not named check their own)."""


def check_numbers(values: dict[str, Any]) -> None:
    """Refuse a count below its minimum and a float setting that is not a finite number (NaN
    would be stored as a run's parameter and make every result NaN)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError.invalid(name, value, "must be a finite number")
        minimum = MINIMUMS.get(name)
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError.invalid(name, value, f"must be at least {minimum}")


def setting(
    default: Any = dataclasses.MISSING,
    help: str | None = None,
    *,
    flag: str | None = None,
    word: str | None = None,
    hidden: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is a setting. ``flag``: its command-line flag where it is not the
    field's name; ``word``: the word the command line takes for None ("off", "all"); ``hidden``:
    a setting the command line does not offer (its default always holds there); ``factory``: the
    default of a nested dataclass."""
    metadata = {"help": help, "flag": flag, "word": word, "hidden": hidden}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flat_params(settings: Any) -> dict[str, Any]:
    """A settings dataclass's values by field name, those of the settings dataclasses it nests
    (such as :class:`qloc.engine.attribution.AttributionSettings`) in their place, as the command
    line flattens them: the parameters a run stores and compares, in the layout they had before the
    settings were grouped."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        nested = dataclasses.is_dataclass(value) and not isinstance(value, type)
        given = flat_params(value) if nested else {f.name: value}
        twice = values.keys() & given.keys()
        assert not twice, f"{type(settings).__name__} has {twice} twice"
        values.update(given)
    return values


def help_of(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("help") or COMMON_HELP.get(field.name, "")


def flag_of(name: str, field: dataclasses.Field[Any] | None = None) -> str:
    """The command-line flag of a setting: declared, or ``--`` and its name with dashes."""
    declared = field.metadata.get("flag") if field is not None else None
    return declared or "--" + name.replace("_", "-")
