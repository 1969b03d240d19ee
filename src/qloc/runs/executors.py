"""Where a sweep's units run: in this process (``local``, the default) or on Ray (``ray``).

Both executors share one contract with the run store: a unit's rows are written by the process
that holds the store (this one), in one transaction per unit, and finished units are skipped on
resume. With Ray, each actor holds one model replica (one GPU each, or one CPU core with
``--workers N``) and computes units it is sent; it returns the unit's rows, and the driver writes
them. An actor that dies has its unit sent to another (a fresh replica replaces it); a driver
that dies resumes from the store when the command is rerun. A unit is never written twice: the
store's units table refuses a second mark of the same unit.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.models import LoadedModel, load_model
from ..errors import ContextLengthError, QlocError
from .store import RunLock, RunStore, UnitWriter, environment
from .sweep import SkipFact, SweepSummary, U, make_progress, run_sweep, unit_size, unit_skip

WorkFn = Callable[[Any, UnitWriter], None]
WorkBuilder = Callable[[LoadedModel], WorkFn]
"""Builds a sweep's work function from a loaded model; sent to every Ray actor, so it must pickle
(a module-level function or a ``functools.partial`` of one)."""
Executor = Literal["local", "ray"]
MAX_ATTEMPTS = 3
"""A unit whose worker died this many times is recorded as skipped, with the reason."""


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: :func:`qloc.load_model` arguments."""

    name: str
    device: str = "auto"
    dtype: str = "float32"

    def load(self) -> LoadedModel:
        return load_model(self.name, device=self.device, dtype=self.dtype)


def model_environment(lm: LoadedModel) -> dict:
    """The environment stored beside a stage's parameters: versions, machine, model."""
    return {**environment(), "model": lm.describe()}


@dataclass
class SweepPlan:
    """One sweep: which stage, its parameters, its units, and how to build its work function."""

    run_dir: Any
    stage: str
    params: dict
    units: Sequence[Any]
    build: WorkBuilder
    model: ModelSpec
    description: str


def execute(
    plan: SweepPlan,
    executor: Executor = "local",
    lm: LoadedModel | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> SweepSummary:
    """Run ``plan`` with the chosen executor; ``lm`` (local only) reuses an already loaded model.

    This process (Ray's driver) holds the run directory's lock from before the model loads until the
    sweep ends, so a second sweep on the same directory is refused at once, before loading anything."""
    if executor not in ("local", "ray"):
        raise QlocError(f"--executor {executor!r}: choose local or ray")
    if not plan.units:
        raise QlocError(f"0 units selected for {plan.description}: nothing to run")
    with RunLock.acquire(plan.run_dir):
        RunStore.check_stage(plan.run_dir, plan.stage, plan.params)
        if executor == "local":
            lm = lm or plan.model.load()
            with RunStore.open_stage(plan.run_dir, plan.stage, plan.params, model_environment(lm)) as store:
                return run_sweep(
                    store, plan.stage, plan.units, plan.build(lm), quiet=quiet, description=plan.description
                )
        with RayPool(plan.model, plan.build, ray_address, workers) as pool:
            with RunStore.open_stage(plan.run_dir, plan.stage, plan.params, pool.environment()) as store:
                return pool.run(store, plan.stage, plan.units, quiet=quiet, description=plan.description)


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

    def run(self, unit) -> tuple[str, Any, float]:
        """("done", rows, seconds), ("skipped", (kind, reason), seconds) or ("oom", message, seconds)."""
        import torch

        writer = UnitWriter()
        started = time.perf_counter()
        try:
            self.work(unit, writer)
        except (SkipFact, ContextLengthError) as exc:
            skip = unit_skip(unit, exc)
            return "skipped", (skip.kind, str(skip)), time.perf_counter() - started
        except torch.OutOfMemoryError as exc:
            return "oom", str(exc).splitlines()[0], time.perf_counter() - started
        return "done", writer.rows, time.perf_counter() - started


class RayPool:
    """Model replicas on Ray actors, fed units by the driver (this process)."""

    def __init__(
        self, model: ModelSpec, build: WorkBuilder, address: str | None = None, workers: int | None = None
    ) -> None:
        try:
            import ray
        except ImportError:
            raise QlocError("--executor ray needs Ray: pip install 'qloc[ray]'") from None
        self.ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            # Ray lowers its workers' priority (nice 15) by default; here they are the sweep's main
            # compute, and must not starve behind other work on a shared machine.
            os.environ.setdefault("RAY_worker_niceness", "0")
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except ConnectionError as exc:
                raise QlocError(f"--ray-address {address!r}: no Ray cluster there ({exc})") from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if model.device.startswith("cuda") and not gpus:
            raise QlocError(f"--device {model.device}: the Ray cluster has no GPU")
        if gpus and (model.device == "auto" or model.device.startswith("cuda")):
            resources = {"num_gpus": 1, "num_cpus": 1}
            model = ModelSpec(model.name, "cuda", model.dtype)  # each actor sees its one GPU as cuda:0
            self.size = workers or gpus
        else:
            resources = {"num_gpus": 0, "num_cpus": 1}
            self.size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Dead actors are replaced by the driver (with their unit resent), not restarted by Ray.
        self._actor_class = ray.remote(max_restarts=0, **resources)(SweepWorker)
        self._model, self._build = model, build
        self.actors = [self._new_actor() for _ in range(self.size)]

    def _new_actor(self):
        return self._actor_class.remote(self._model, self._build)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
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

    def run(
        self,
        store: RunStore,
        stage: str,
        units: Sequence[U],
        quiet: bool = False,
        description: str | None = None,
    ) -> SweepSummary:
        ray = self.ray
        summary = SweepSummary()
        finished = store.finished_units(stage)
        pending = deque(u for u in units if u.id not in finished)
        summary.resumed = len(units) - len(pending)
        attempts: Counter = Counter()
        in_flight: dict[Any, tuple[int, Any]] = {}  # object ref -> (actor slot, unit)
        idle = list(range(len(self.actors)))
        with make_progress(quiet) as progress:
            task = progress.add_task(description or stage, total=sum(map(unit_size, pending)), status="")
            while pending or in_flight:
                while pending and idle:
                    slot, unit = idle.pop(), pending.popleft()
                    in_flight[self.actors[slot].run.remote(unit)] = (slot, unit)
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                slot, unit = in_flight.pop(ref)
                try:
                    status, payload, seconds = ray.get(ref)
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
                        pending.appendleft(unit)  # another (or the fresh) replica takes it next
                        continue
                    status, payload = (
                        "skipped",
                        ("worker died", f"{unit.label}: its worker died {MAX_ATTEMPTS} times"),
                    )
                except ray.exceptions.RayTaskError as exc:
                    raise QlocError(
                        f"{unit.label} failed on a Ray worker; finished units are stored in "
                        f"{str(store.run_dir)!r}: {exc.cause!r}"
                    ) from None
                else:
                    idle.append(slot)
                if status == "oom":
                    raise QlocError(
                        f"out of memory on {unit.label} ({payload}); the {summary.done} units finished in this session "
                        f"are stored in {str(store.run_dir)!r}. Rerun with a smaller --max-batch-rows to resume."
                    )
                if status == "done":
                    store.commit_unit(stage, unit.id, payload, seconds)
                    summary.done += 1
                else:
                    kind, reason = payload
                    store.skip(stage, unit.id, reason)
                    summary.skipped += 1
                    summary.skip_reasons[kind] += 1
                progress.update(
                    task,
                    advance=unit_size(unit),
                    status=f"done {summary.done} skipped {summary.skipped} ({self.size} workers)",
                )
        return summary
