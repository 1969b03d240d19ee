"""One measurement each of the GPU benchmark: engine, reference loop, replicas in flight, memory
per row, the batch-rows estimate for a card not at hand, and a profile."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import transformers

import qloc
from benchmarks.gpu.models import CUDA_CONTEXT_BYTES, LLAMA3_8B, synchronize, timed
from qloc.engine.attribution import attribute
from qloc.engine.models import LoadedModel
from qloc.engine.paths import (
    PathIntegrator,
    default_batch_rows,
    frozen_parameters,
    gpu_batch_rows,
    integration_points,
)
from qloc.engine.sites import NEURONS
from qloc.runs.profiling import peak_memory
from qloc.testing import reference_scores


def exact_cpu_peaks() -> None:
    """Make the CPU's resident-set peaks see every pass: glibc serves blocks below its mmap threshold
    (128 KiB, rising to 32 MiB as blocks are freed) from a heap that stays resident, so a pass
    reusing them would not raise the high-water mark. A fixed 16 KiB threshold maps every tensor of
    a batch of rows on its own and returns it when freed (M_MMAP_THRESHOLD is -3)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 16 * 1024)


def peak_bytes(memory: dict[str, float]) -> float:
    """Bytes of the peak that :func:`qloc.runs.profiling.peak_memory` measured (in MiB): a whole
    number, as the counters it reads (NaN where it could not measure)."""
    value = memory["peak_mb"] * 2**20
    return round(value) if math.isfinite(value) else value


def measure_engine(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], method: str, steps: int
) -> dict[str, Any]:
    attribute(lm, *queries[0], method, steps=steps)  # warm-up: kernels, handles, the allocator's pool
    runs = []
    for prompt, answer in queries:
        batch_rows = default_batch_rows(lm)  # what the engine is about to choose: nothing allocates between
        with peak_memory(lm.device) as memory:
            result, seconds = timed(
                lm.device,
                lambda prompt=prompt, answer=answer: attribute(lm, prompt, answer, method, steps=steps),
            )
        total_rows = lm.num_layers * (steps + 1) * result.params["baselines"]
        runs.append(
            dict(
                seconds=seconds,
                batch_rows=batch_rows,
                total_rows=total_rows,
                passes=math.ceil(total_rows / batch_rows),
                peak_bytes=peak_bytes(memory),
            )
        )
    return dict(seconds_per_query=statistics.mean(r["seconds"] for r in runs), runs=runs, last=result)


def measure_reference(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], method: str, steps: int, layers: int
) -> dict[str, Any]:
    """The reference loop over the first ``layers`` layers, its time extrapolated linearly to all: its
    cost is one full-depth batch of ``steps`` sequences per layer (its single clean forward, counted
    L / layers times over, makes the extrapolation a slight overestimate)."""
    reference_scores(lm, *queries[0], method, steps=2, layers=layers)  # warm-up
    seconds, scores = [], []
    for prompt, answer in queries:
        score, elapsed = timed(
            lm.device,
            lambda prompt=prompt, answer=answer: reference_scores(
                lm, prompt, answer, method, steps=steps, layers=layers
            ),
        )
        seconds.append(elapsed)
        scores.append(score)
    timed_seconds = statistics.mean(seconds)
    return dict(
        layers_timed=layers,
        seconds_timed=timed_seconds,
        seconds_per_query=timed_seconds * lm.num_layers / layers,
        scores=scores,
    )


def measure_in_flight(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], method: str, steps: int, copies: int
) -> dict[str, Any]:
    """Queries per second with ``copies`` replicas of the model each attributing every query in its
    own thread and (on a GPU) its own CUDA stream. Replicas, not one shared model: the engine hooks
    the model's modules while it runs, so two threads on one model would see each other's hooks."""
    replicas = [lm] + [
        qloc.wrap_model(copy.deepcopy(lm.model), lm.tokenizer, name=f"{lm.name}-replica-{i}")
        for i in range(1, copies)
    ]
    batch_rows = max(1, default_batch_rows(lm) // copies)  # each replica's share of the free memory
    for replica in replicas[1:]:
        attribute(replica, *queries[0], method, steps=steps, max_batch_rows=batch_rows)  # warm-up

    def attribute_all(replica: LoadedModel) -> None:
        stream = torch.cuda.Stream(lm.device) if lm.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for prompt, answer in queries:
                attribute(replica, prompt, answer, method, steps=steps, max_batch_rows=batch_rows)
        synchronize(lm.device)

    def run_all() -> None:
        with ThreadPoolExecutor(copies) as pool:
            for future in [pool.submit(attribute_all, replica) for replica in replicas]:
                future.result()

    _, seconds = timed(lm.device, run_all)
    return dict(
        copies=copies,
        batch_rows=batch_rows,
        queries=copies * len(queries),
        seconds=seconds,
        queries_per_second=copies * len(queries) / seconds,
    )


def measure_row_memory(lm: LoadedModel, prompt_tokens: int, steps: int) -> dict[str, Any]:
    """Memory of one row per layer it runs (saved activations, its copy of the prefix cache) and in
    the output head, solved from the peaks of three IG integrations whose largest pass is known:
    n and 2n rows all at layer 0 (each runs all L layers), then R = steps + 1 rows at layer 0 with
    R at layer 1: peak = fixed + rows_at_0 (L a + h) + rows_at_1 ((L - 1) a + h)."""
    rows_per_layer = steps + 1
    half = rows_per_layer // 2
    ids = [(7 * i + 11) % lm.config.vocab_size for i in range(prompt_tokens)]
    alphas, weights = integration_points(steps)
    with frozen_parameters(lm):
        clean = PathIntegrator(lm, NEURONS, half).clean_run(ids, ids[0])  # integrate leaves it intact
        # Twice over, keeping the second: the first use of a batch shape allocates workspaces for good
        # (oneDNN's on the CPU, cuBLAS's on a GPU).
        for _ in range(2):
            peaks = []
            for batch_rows in (half, 2 * half, 2 * rows_per_layer):
                with peak_memory(lm.device) as memory:
                    PathIntegrator(lm, NEURONS, batch_rows).integrate(clean, None, alphas, weights)
                peaks.append(peak_bytes(memory))
    full_row = (peaks[1] - peaks[0]) / half  # L a + h
    fixed = peaks[0] - half * full_row
    per_row_layer = 2 * full_row - (peaks[2] - fixed) / rows_per_layer
    return dict(
        prompt_tokens=prompt_tokens,
        peaks=peaks,
        fixed_bytes=fixed,
        per_row_layer_bytes=per_row_layer,
        head_bytes_per_row=full_row - lm.num_layers * per_row_layer,
    )


def batch_rows_estimate(
    layers: int, dtype: torch.dtype, total_bytes: int, weight_bytes: int
) -> dict[str, Any]:
    """What default_batch_rows picks for Llama-3-8B's shape on a GPU of ``total_bytes`` holding
    the weights, the CUDA context aside: its estimate, given that free memory."""
    config = transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    free = total_bytes - weight_bytes - CUDA_CONTEXT_BYTES
    rows = gpu_batch_rows(config, dtype, layers, config.intermediate_size, free)
    return dict(total_bytes=total_bytes, free_bytes=free, batch_rows=rows, bytes_per_row=0.5 * free / rows)


def profile_query(lm: LoadedModel, query: tuple[str, str], method: str, steps: int) -> str:
    """Where one query's time goes: the torch profiler's operators by their own device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = lm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        attribute(lm, *query, method, steps=steps)
        synchronize(lm.device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
