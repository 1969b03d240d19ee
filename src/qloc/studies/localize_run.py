"""A localize run read back as the experiments on it (editing, mapping, synapses) read it: its KN
sets per fact for one method, its facts within the full dataset, the model to load, and the
request every such experiment takes (which run, whose KN sets, how many of its facts)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.pararel import Fact, load_pararel
from ..data.selection import Selection
from ..engine.attribution import AttributionSettings
from ..engine.models import DEFAULT_DEVICE
from ..errors import ConfigError, DataError, QlocError
from ..runs.executors import Execution, ModelSpec, SweepPlan, WorkBuilder
from ..runs.store import RunStore
from ..settings import setting
from .consistency_tables import classify, fact_consistency
from .knrows import CasSetRow, KnSetRow
from .knsets import SHARED_FILTER_MIN_FACTS, FactKNSets, SharedNeuronFilter
from .stored_knsets import LOCALIZE_STAGE


def kn_sets_from_store(kn_frame: pd.DataFrame, cas_frame: pd.DataFrame, method: str) -> dict[str, FactKNSets]:
    """Per fact id, the KN sets the localize run stored for ``method``."""
    kn_frame = kn_frame[kn_frame["method"] == method]
    if kn_frame.empty:
        raise QlocError(f"the localize run has no KN sets for method {method!r}")
    cas = {
        row.fact_id: [tuple(u) for u in row.kn]
        for row in cas_frame[cas_frame["method"] == method].itertuples()
    }
    result = {}
    for fact_id, group in kn_frame.groupby("fact_id", sort=False):
        sets = [[tuple(u) for u in k] for k in group.sort_values("query_index")["kn"]]
        result[fact_id] = FactKNSets(sets, cas.get(fact_id, []), str(group["relation"].iloc[0]))
    return result


LOCALIZED_RUN_HELP = "A localize run: its model, facts and KN sets are used."
FACT_LIMIT_HELP = "Only the first N of the run's facts in a seeded order (raise it later to extend the run)."
STRATA = ("static", "otsu")
"""The KC/KI thresholds a sample can be stratified by (METHODS.md section 4)."""
STRATIFY_HELP = (
    "Draw the --limit sample about half KC, half KI facts (all of a class that has fewer), classed by "
    "their CS under the static or the Otsu threshold; default: no stratification."
)
STRATIFY_METHOD_HELP = "Whose KN sets class the facts for --stratify (default: the study's method)."


def check_stratification(stratify: str | None, stratify_method: str | None) -> None:
    """Refuse an unknown stratification, and a method to stratify by without one."""
    if stratify is not None and stratify not in STRATA:
        raise ConfigError.invalid("stratify", stratify, f"choose {' or '.join(STRATA)}")
    if stratify is None and stratify_method is not None:
        raise ConfigError(
            lambda name: (
                f"{name('stratify_method')} {stratify_method!r} needs {name('stratify')} (static or otsu)"
            )
        )


def stratified_prefix(ordered: Sequence[Fact], classes: Mapping[str, str], limit: int) -> list[Fact]:
    """The first ``limit`` facts of a stratified sample of ``ordered`` (a seeded order): half of them
    (the odd one to KC) from the KC facts and half from the KI facts, each class's in ``ordered``'s
    order, and a class with fewer facts than its half gives all it has and the other fills the
    rest. How many a class gives never falls as ``limit`` grows, so a larger limit extends each
    class's prefix, as an unstratified limit extends the run's."""
    kc = [f for f in ordered if classes[f.id] == "KC"]
    ki = [f for f in ordered if classes[f.id] == "KI"]
    from_kc = min(len(kc), max(math.ceil(limit / 2), limit - len(ki)))
    chosen = {f.id for f in kc[:from_kc] + ki[: limit - from_kc]}
    return [f for f in ordered if f.id in chosen]


@dataclass
class LocalizedRun:
    """What the experiments on a localize run need: its KN sets for one method, its facts within
    the full dataset (each with the queries the run localized, in its order: with the known filter
    only the known ones, so query 0, the Self set and the edited query, is a known query), and
    which model to load."""

    run_dir: Path
    params: dict[str, Any]
    method: str
    knowledge: dict[str, FactKNSets]
    dataset: list[Fact]
    facts: list[Fact]
    device: str
    source: str
    """Where the facts were read from (:attr:`qloc.data.selection.Selection.source`)."""

    @property
    def model(self) -> ModelSpec:
        return ModelSpec(self.params["model"], self.device, self.params["dtype"])

    def sweep(
        self,
        stage: str,
        config: dict[str, Any],
        build: WorkBuilder,
        description: str,
        units: Sequence[Any] | None = None,
    ) -> SweepPlan:
        """An experiment on the run's facts (or on ``units``) as a sweep into the run's directory; its
        parameters are the run's model and dtype, then the experiment's ``config``."""
        params = {"model": self.params["model"], "dtype": self.params["dtype"], **config}
        chosen = self.facts if units is None else units
        return SweepPlan(
            self.run_dir, stage, params, chosen, build, self.model, description, source=self.source
        )

    def first_facts(self, limit: int | None, seed: int) -> list[Fact]:
        """The first ``limit`` facts of the run in one seeded order (all with None): a prefix of a
        fixed order, so that a larger limit extends a study's run instead of starting another."""
        if limit is not None and limit < 1:
            raise ConfigError.invalid("limit", limit, "at least 1")
        facts = list(self.facts)
        random.Random(seed).shuffle(facts)
        return facts[:limit] if limit is not None else facts

    def shared_filter(
        self, share: float | None, reference: Path | None = None, min_facts: int = SHARED_FILTER_MIN_FACTS
    ) -> SharedNeuronFilter:
        """The shared-neuron filter over this run's KN sets, its shares counted over this run's
        facts or, with ``reference``, over those of another localize run of the same model whose
        KN sets were cut the same way (:func:`reference_kn_sets`)."""
        if reference is None:
            return SharedNeuronFilter(share, self.knowledge, "this run", min_facts)
        pool = reference_kn_sets(reference, self.params, self.method)
        return SharedNeuronFilter(share, pool, f"reference run {str(reference)!r}", min_facts)

    def knowledge_classes(self, stratify: str, method: str) -> dict[str, str]:
        """Per fact id, KC or KI by the run's ``method`` KN sets under the ``stratify`` threshold
        (static, or Otsu's over the run's facts), as the consistency study classes them."""
        with RunStore.open_existing(self.run_dir) as store:
            kn_frame = store.frame(KnSetRow)
        kn_frame = kn_frame[kn_frame["method"] == method]
        if kn_frame.empty:
            raise QlocError(f"the localize run has no KN sets for method {method!r} to stratify by")
        classes = classify(fact_consistency(kn_frame))
        return dict(zip(classes["fact_id"], classes[f"class_{stratify}"]))

    def sample(
        self, limit: int | None, seed: int, stratify: str | None = None, stratify_method: str | None = None
    ) -> FactSample:
        """The facts a study takes: the seeded prefix of :meth:`first_facts`, or with ``stratify``
        its class-stratified counterpart (:func:`stratified_prefix`, classes by ``stratify_method``'s
        KN sets, default the study's method); with the parameters that say which."""
        check_stratification(stratify, stratify_method)
        if stratify is None:
            return FactSample(self.first_facts(limit, seed), {"stratify": None, "stratify_method": None})
        method = stratify_method or self.method
        ordered = self.first_facts(None, seed)
        classes = self.knowledge_classes(stratify, method)
        facts = stratified_prefix(ordered, classes, limit) if limit is not None else ordered
        counts = Counter(classes[f.id] for f in facts)
        description = (
            f"; {counts['KC']} KC and {counts['KI']} KI facts ({stratify} threshold, {method} KN sets)"
        )
        chosen = {f.id: classes[f.id] for f in facts}
        return FactSample(facts, {"stratify": stratify, "stratify_method": method}, description, chosen)


@dataclass
class FactSample:
    """The facts a study on a localize run takes, the stage parameters that say how they were drawn
    (a prefix of one seeded order extends a stage; another way of drawing is another stage's
    parameters), and, for a stratified sample, its classes in words (appended to a summary, so it
    starts with its separator)."""

    facts: list[Fact]
    params: dict[str, Any]
    note: str = ""
    classes: dict[str, str] | None = None
    """Per fact id, the class its rows carry in a stratified sample: its stratum (KC/KI by the
    stratification's threshold and method); None: each study's own static class."""


@dataclass(frozen=True)
class LocalizedRequest:
    """What every experiment on a localize run takes (each adds its own config)."""

    run_dir: Path = setting(help=LOCALIZED_RUN_HELP)
    method: str | None = setting(None)
    limit: int | None = setting(None, FACT_LIMIT_HELP)
    stratify: str | None = setting(None, STRATIFY_HELP)
    stratify_method: str | None = setting(None, STRATIFY_METHOD_HELP)
    device: str = setting(DEFAULT_DEVICE)
    execution: Execution = setting(factory=Execution)

    def __post_init__(self) -> None:
        check_stratification(self.stratify, self.stratify_method)

    def read(self) -> LocalizedRun:
        return read_localized_run(self.run_dir, self.method, self.device)

    def sample(self, localized: LocalizedRun, seed: int) -> FactSample:
        """The run's facts this request takes (:meth:`LocalizedRun.sample`)."""
        return localized.sample(self.limit, seed, self.stratify, self.stratify_method)


def read_localized_run(
    run_dir: Path, method: str | None = None, device: str = DEFAULT_DEVICE
) -> LocalizedRun:
    """A localize run as the experiments on it read it; ``method``: whose KN sets (default: the
    run's first method). Refuses data that no longer says what the run localized."""
    with RunStore.open_existing(run_dir) as store:
        localized = store.params(LOCALIZE_STAGE)
        kn_frame, cas_frame = store.frame(KnSetRow), store.frame(CasSetRow)
        method = method or localized["methods"][0]
        knowledge = kn_sets_from_store(kn_frame, cas_frame, method)
        data = Selection(data=None if localized["data"] == "bundled" else Path(localized["data"]))
        dataset = load_pararel(data.data, query_filter=localized["query_filter"]).facts
        kn_frame = kn_frame[kn_frame["method"] == method]
        localized_queries = {
            fact_id: tuple(group.sort_values("query_index")["prompt"])
            for fact_id, group in kn_frame.groupby("fact_id", sort=False)
        }
        facts = [replace(f, queries=localized_queries[f.id]) for f in dataset if f.id in knowledge]
        _refuse_changed_data(run_dir, kn_frame, facts, data.source)
        store.refuse_other_facts(LOCALIZE_STAGE, facts, data.source)
    return LocalizedRun(Path(run_dir), localized, method, knowledge, dataset, facts, device, data.source)


KN_CUT = ("model", "dtype", "query_filter", *(f.name for f in fields(AttributionSettings)))
"""The localize parameters that decide which neurons enter a KN set (the model, the queries and
every attribution setting): a reference run for the shared-neuron filter must agree with the
edited run on all of them."""


def reference_kn_sets(reference: Path, params: Mapping[str, Any], method: str) -> dict[str, FactKNSets]:
    """The ``method`` KN sets of the localize run ``reference``, refused where its model or the way
    its KN sets were cut differs from ``params`` (another run's localize parameters)."""
    with RunStore.open_existing(reference) as store:
        theirs = store.params(LOCALIZE_STAGE)
        differing = [k for k in KN_CUT if theirs.get(k) != params.get(k)]
        if differing:
            details = "; ".join(f"{k}: {theirs.get(k)!r} there, {params.get(k)!r} here" for k in differing)
            raise ConfigError(
                lambda name: (
                    f"{name('shared_reference')} {str(reference)!r} cut its KN sets otherwise than this "
                    f"run ({details}): its shares would not count the same neurons"
                )
            )
        if method not in theirs["methods"]:
            raise ConfigError(
                lambda name: (
                    f"{name('shared_reference')} {str(reference)!r} has no {method} KN sets "
                    f"(it localized with {', '.join(theirs['methods'])})"
                )
            )
        return kn_sets_from_store(store.frame(KnSetRow), store.frame(CasSetRow), method)


def _refuse_changed_data(run_dir: Path, kn_frame: pd.DataFrame, facts: list[Fact], source: str) -> None:
    """Refuse data that lacks a localized fact or gives it another answer than the run localized
    (the check of runs made before facts were recorded; others are also compared by digest)."""
    answers = kn_frame.groupby("fact_id")["answer"].first()
    found = {f.id for f in facts}
    if missing := [fact_id for fact_id in answers.index if fact_id not in found]:
        raise DataError(
            f"{source!r} has no usable fact {missing[0]} ({len(missing)} in all), which run directory "
            f"{str(run_dir)!r} localized: the data changed, or the path names another file"
        )
    for fact in facts:
        if fact.object != answers[fact.id]:
            raise DataError(
                f"{source!r} now has {fact.label}, but run directory {str(run_dir)!r} localized it "
                f"with the answer {answers[fact.id]!r}: the data changed, or the path names another file"
            )
