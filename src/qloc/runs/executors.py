"""Where a sweep's units run: in this process (``local``, the default) or on Ray (``ray``).

Both executors share one contract with the run store: a unit's rows are written by the process
that holds the store (this one), in one transaction per unit, and finished units are skipped on
resume (:func:`qloc.runs.sweep.drive`, the one sweep loop). With Ray, each actor holds one model
replica (one GPU each, or one CPU core with ``workers``) and computes units it is sent; it returns
the unit's rows, and the driver writes them. An actor that dies has its unit sent to another (a
fresh replica replaces it); a driver that dies resumes from the store when the command is rerun.
A unit is never written twice: the store's units table refuses a second mark of the same unit.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.pararel import Fact
from ..engine.models import DEFAULT_DEVICE, DEFAULT_DTYPE, LoadedModel, load_model
from ..errors import ConfigError, QlocError
from ..settings import setting
from .store import RunLock, RunStore, environment
from .sweep import Display, SweepSummary, UnitResult, WorkFn, drive, run_sweep, run_unit

WorkBuilder = Callable[[LoadedModel], WorkFn]
"""Builds a sweep's work function from a loaded model; sent to every Ray actor, so it must pickle.
Each study's is a frozen dataclass holding what the work is given, with a ``__call__(lm)`` (such as
:class:`qloc.studies.localize.LocalizeWorkBuilder`), so that a reader can follow a setting there."""
EXECUTORS = ("local", "ray")
MAX_ATTEMPTS = 3
"""A unit whose worker died this many times is recorded as skipped, with the reason."""
log = logging.getLogger("qloc")


@dataclass(frozen=True)
class Execution:
    """Where a sweep runs, and whether it shows progress."""

    executor: str = setting(
        "local", "local (this process) or ray (one model replica per GPU, or per CPU core with --workers)."
    )
    ray_address: str | None = setting(None, "Ray cluster: auto, HOST:PORT (default: start a local one).")
    workers: int | None = setting(None, "Ray: model replicas (default: one per GPU, else one per CPU core).")
    quiet: bool = setting(False)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError.invalid("executor", self.executor, "choose local or ray")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: :func:`qloc.load_model` arguments."""

    name: str
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE

    def load(self) -> LoadedModel:
        log.info("loading %s ...", self.name)
        return load_model(self.name, device=self.device, dtype=self.dtype)


def model_environment(lm: LoadedModel) -> dict[str, Any]:
    """The environment stored beside a stage's parameters: versions, machine, model."""
    return {**environment(), "model": lm.describe()}


@dataclass
class SweepPlan:
    """One sweep: which stage, its parameters, its units, and how to build its work function."""

    run_dir: Path
    stage: str
    params: dict[str, Any]
    units: Sequence[Any]
    build: WorkBuilder
    model: ModelSpec
    description: str
    required_table: str | None = None
    """A table every done unit has rows in: a resume recomputes the units whose rows are gone."""
    source: str | None = None
    """Where the units' facts come from (:attr:`qloc.data.selection.Selection.source`); with it,
    the store records each fact's digest and refuses a resume whose data changed."""

    @property
    def facts(self) -> list[Fact]:
        """The facts of the units: units that are facts, and those of units of several facts."""
        if self.source is None:
            return []
        return [
            f
            for unit in self.units
            for f in ((unit,) if isinstance(unit, Fact) else getattr(unit, "facts", ()))
        ]


def execute(
    plan: SweepPlan, execution: Execution = Execution(), lm: LoadedModel | None = None
) -> SweepSummary:
    """Run ``plan`` with the chosen executor; ``lm`` (local only) reuses an already loaded model.

    This process (Ray's driver) holds the run directory's lock from before the model loads until the
    sweep ends, so a second sweep on the same directory is refused at once, before loading anything."""
    if not plan.units:
        raise QlocError(f"0 units selected for {plan.description}: nothing to run")
    with RunLock.acquire(plan.run_dir):
        RunStore.check_stage(plan.run_dir, plan.stage, plan.params)
        if plan.source is not None:
            RunStore.check_facts(plan.run_dir, plan.stage, plan.facts, plan.source)
        quiet = execution.quiet
        if execution.executor == "local":
            lm = lm or plan.model.load()
            with _open_stage(plan, model_environment(lm)) as store:
                return run_sweep(store, plan.stage, plan.units, plan.build(lm), quiet, plan.description)
        with RayPool(plan.model, plan.build, execution.ray_address, execution.workers, plan.run_dir) as pool:
            with _open_stage(plan, pool.environment()) as store:
                display = Display(quiet, plan.description, pool.size)
                return drive(store, plan.stage, plan.units, pool.results, display)


def _open_stage(plan: SweepPlan, env: dict[str, Any]) -> RunStore:
    """The plan's stage opened for writing, with its facts recorded (those of a run made before facts
    were recorded are recorded on its first resume)."""
    store = RunStore.open_stage(plan.run_dir, plan.stage, plan.params, env)
    try:
        if plan.source is not None:
            store.record_facts(plan.stage, plan.facts, plan.source)
        if plan.required_table is not None and (
            lost := store.forget_units_without_rows(plan.stage, plan.required_table)
        ):
            log.warning(
                "%d finished units of %r have no rows in table %r of %r: computing them again",
                lost,
                plan.stage,
                plan.required_table,
                str(plan.run_dir),
            )
    except BaseException:
        store.close()
        raise
    return store


class SweepWorker:
    """A Ray actor's state: one model replica and the sweep's work function."""

    def __init__(self, model: ModelSpec, build: WorkBuilder) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.lm = model.load()
        self.work = build(self.lm)

    def environment(self) -> dict:
        return model_environment(self.lm)

    def pid(self) -> int:
        return os.getpid()

    def run(self, unit: Any) -> UnitResult:
        return run_unit(self.work, unit)


class RayPool:
    """Model replicas on Ray actors, fed units by the driver (this process); ``run_dir``: where the
    driver stores the finished units (an error on a worker names it)."""

    def __init__(
        self,
        model: ModelSpec,
        build: WorkBuilder,
        address: str | None = None,
        workers: int | None = None,
        run_dir: Path | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                lambda name: f"{name('executor')} ray needs Ray: pip install 'qloc[ray]'"
            ) from None
        self.ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            # Ray lowers its workers' priority (nice 15) by default; here they are the sweep's main
            # compute, and must not starve behind other work on a shared machine.
            os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                ray.init(
                    address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
                )
            except ConnectionError as exc:
                raise ConfigError.invalid("ray_address", address, f"no Ray cluster there ({exc})") from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if model.device.startswith("cuda") and not gpus:
            raise ConfigError.invalid("device", model.device, "the Ray cluster has no GPU")
        if gpus and (model.device == "auto" or model.device.startswith("cuda")):
            gpus_per_worker = 1
            model = ModelSpec(model.name, "cuda", model.dtype)  # each actor sees its one GPU as cuda:0
            self.size = workers or gpus
        else:
            gpus_per_worker = 0
            self.size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Dead actors are replaced by the driver (with their unit resent), not restarted by Ray.
        self._actor_class = ray.remote(max_restarts=0, num_gpus=gpus_per_worker, num_cpus=1)(SweepWorker)
        self._model, self._build, self.run_dir = model, build, run_dir
        self.actors = [self._new_actor() for _ in range(self.size)]

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._model, self._build)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self._started_here:
            self.ray.shutdown()

    def environment(self) -> dict:
        try:
            env = self.ray.get(self.actors[0].environment.remote())
        except self.ray.exceptions.RayActorError as exc:
            raise QlocError(f"Ray workers could not load {self._model.name!r}: {exc}") from None
        return {**env, "executor": {"kind": "ray", "workers": self.size}}

    def pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def results(self, pending: list[Any], summary: SweepSummary) -> Iterator[tuple[Any, UnitResult]]:
        """Send ``pending`` units to the actors and yield each (unit, result) as it comes back; a
        unit whose actor died goes to a fresh one (counted in ``summary.retried``), up to
        MAX_ATTEMPTS times."""
        ray = self.ray
        queue = deque(pending)
        attempts: Counter[str] = Counter()
        in_flight: dict[Any, tuple[int, Any]] = {}  # object ref -> (actor slot, unit)
        idle = list(range(len(self.actors)))
        while queue or in_flight:
            while queue and idle:
                slot, unit = idle.pop(), queue.popleft()
                in_flight[self.actors[slot].run.remote(unit)] = (slot, unit)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            slot, unit = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError,
            ):
                attempts[unit.id] += 1
                self.actors[slot] = self._new_actor()
                summary.retried += 1
                idle.append(slot)
                if attempts[unit.id] < MAX_ATTEMPTS:
                    queue.appendleft(unit)  # another (or the fresh) replica takes it next
                    continue
                reason = ("worker died", f"{unit.label}: its worker died {MAX_ATTEMPTS} times")
                result = UnitResult("skipped", reason=reason)
            except ray.exceptions.RayTaskError as exc:
                raise QlocError(
                    f"{unit.label} failed on a Ray worker; finished units are stored in "
                    f"{str(self.run_dir)!r}: {exc.cause!r}"
                ) from None
            else:
                idle.append(slot)
            yield unit, result
