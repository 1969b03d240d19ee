"""The GPU benchmark's runs of its measurements, as printed lines and JSON."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.gpu.measure import (
    measure_engine,
    measure_in_flight,
    measure_reference,
    measure_row_memory,
    profile_query,
)
from benchmarks.gpu.models import LLAMA3_8B, PROMPT_TOKENS
from benchmarks.throughput import PARAREL_FACTS, PARAREL_QUERIES, Shape, query_flops
from qloc.engine.models import LoadedModel


def versions() -> dict[str, str]:
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu=platform.processor() or platform.machine(),
    )


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = dict(versions(), device=str(device), threads=torch.get_num_threads())
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_bytes=properties.total_memory,
            cuda=torch.version.cuda,
            multiprocessors=properties.multi_processor_count,
        )
    return info


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def print_smollm2(report: dict[str, Any]) -> dict[str, Any]:
    print(
        f"\nsmollm2-135m's configuration, seeded weights (the CPU's weights: {report['same_weights']}); "
        "fp32 here against the CPU's fp32, then KN-set Jaccard of bf16 against fp32:"
    )
    print(
        f"{'method':<6} {'largest score':>14} {'top-32 diff':>12} {'KN = CPU':>9} {'KN size':>8} "
        f"{'bf16 here':>10} {'bf16 CPU':>9} {'real CPU':>9}"
    )
    for method, rows in report["methods"].items():
        for i, row in enumerate(rows):
            print(
                f"{method:<6} {row['largest_score_rel_diff']:>14.1e} "
                f"{row['top_scores_max_diff_over_max']:>12.1e} "
                f"{row['fp32_kn_jaccard_with_cpu']:>9.3f} {row['kn_set_size']:>8} "
                f"{row['bf16_kn_jaccard_with_fp32']:>10.3f} {report['cpu_bf16_jaccard'][method][i]:>9.3f} "
                f"{report['real_smollm2_cpu_bf16_jaccard'][method][i]:>9.3f}"
            )
    print(
        "(largest score: relative difference; top-32 diff: largest difference at the CPU's top 32 "
        "neurons over the largest score; bf16 CPU / real CPU: the same Jaccard on the CPU, seeded and "
        "real smollm2 weights)"
    )
    return report


def run_methods(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], args: argparse.Namespace, peak_rate: float
) -> dict[str, Any]:
    """Engine and reference loop, side by side, for each method; rates from the cost model."""
    reference_layers = min(args.reference_layers, lm.num_layers)
    shape = Shape(
        lm.num_layers, LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"], LLAMA3_8B["vocab_size"]
    )
    print(
        f"{'method':<6} {'engine s/q':>11} {'ref s/q':>9} {'speed-up':>9} {'ref diff':>9} {'rows':>6} "
        f"{'passes':>6} {'peak':>10} {'TFLOP/q':>8} {'TFLOP/s':>8} {'of peak':>8}"
    )
    measured = {}
    for method in args.methods.split(","):
        engine = measure_engine(lm, queries, method, args.steps)
        reference = measure_reference(lm, queries, method, args.steps, reference_layers)
        flops = query_flops(shape, method, args.steps, PROMPT_TOKENS)
        seconds = engine["seconds_per_query"]
        rate = flops / seconds / 1e12
        # The reference covers the first layers only, and SIG normalises its scores over all layers:
        # only IG and AMIG compare layer by layer.
        diff = None
        if method != "sig":
            ref = reference["scores"][-1]
            diff = float((engine["last"].scores[:reference_layers] - ref).abs().max() / ref.abs().max())
        speedup = reference["seconds_per_query"] / seconds
        measured[method] = dict(
            engine={k: v for k, v in engine.items() if k != "last"},
            reference={k: v for k, v in reference.items() if k != "scores"},
            speedup=speedup,
            reference_max_diff_over_max=diff,
            tflop_per_query=flops / 1e12,
            tflops=rate,
            fraction_of_matmul_rate=rate / peak_rate,
        )
        run = engine["runs"][-1]
        peak = max(r["peak_bytes"] for r in engine["runs"])
        print(
            f"{method:<6} {seconds:>11.3f} {reference['seconds_per_query']:>9.2f} {speedup:>8.1f}x "
            f"{'-' if diff is None else f'{diff:.1e}':>9} {run['batch_rows']:>6} {run['passes']:>6} "
            f"{gib(peak):>10} {flops / 1e12:>8.2f} {rate:>8.2f} {rate / peak_rate:>7.0%}"
        )
    rows = {m: [r["batch_rows"] for r in v["engine"]["runs"]] for m, v in measured.items()}
    print(f"(batch rows of each timed query: {rows})")
    return measured


def estimate_pararel(methods: dict[str, Any], layers: int) -> dict[str, float]:
    """Per fact and full ParaRel (first answer token) with all three methods, at the measured speed."""
    per_query = sum(methods[m]["engine"]["seconds_per_query"] for m in ("ig", "amig", "sig"))
    estimate = dict(
        seconds_per_query_all_methods=per_query,
        seconds_per_fact_all_methods=per_query * PARAREL_QUERIES / PARAREL_FACTS,
        pararel_device_hours_all_methods=per_query * PARAREL_QUERIES / 3600,
    )
    print(
        f"IG + AMIG + SIG: {per_query:.2f} s per query; {estimate['seconds_per_fact_all_methods']:.1f} s "
        f"per ParaRel fact ({PARAREL_QUERIES / PARAREL_FACTS:.2f} queries); "
        f"full ParaRel ({PARAREL_QUERIES} queries): "
        f"{estimate['pararel_device_hours_all_methods']:.1f} device-hours, at {layers} layers"
    )
    return estimate


def run_in_flight(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], args: argparse.Namespace, ig_seconds: float
) -> list[dict[str, Any]]:
    back_to_back = 1 / ig_seconds
    flights = [dict(copies=1, queries_per_second=back_to_back)]
    print(f"\nIG queries/s: back to back {back_to_back:.2f}", end="")
    for copies in args.in_flight:
        flight = measure_in_flight(lm, queries, "ig", args.steps, copies)
        flights.append(flight)
        print(
            f"; {copies} replicas in flight {flight['queries_per_second']:.2f} "
            f"({flight['queries_per_second'] / back_to_back:.2f}x, {flight['batch_rows']} rows each)",
            end="",
        )
    print()
    return flights


def run_row_memory(lm: LoadedModel, steps: int, estimated_per_row: float) -> list[dict[str, Any]]:
    fits = []
    print(
        f"\nmemory per row, solved from three IG pass sizes; default_batch_rows estimates "
        f"{estimated_per_row / 2**20:.1f} MiB per row of the 32-layer shape:"
    )
    for prompt_tokens in (PROMPT_TOKENS, 64):
        fit = measure_row_memory(lm, prompt_tokens, steps)
        at_32 = 32 * fit["per_row_layer_bytes"] + fit["head_bytes_per_row"]
        fits.append(dict(fit, bytes_per_32_layer_row=at_32))
        print(
            f"  {prompt_tokens:>2}-token prompt: {fit['per_row_layer_bytes'] / 2**20:.3f} MiB per row and "
            f"layer, "
            f"{fit['head_bytes_per_row'] / 2**20:.2f} MiB per row in the head: {at_32 / 2**20:.1f} MiB per "
            f"32-layer row (estimate / measured {estimated_per_row / at_32:.1f})"
        )
    return fits


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def print_profile(lm: LoadedModel, query: tuple[str, str], method: str, steps: int) -> str:
    table = profile_query(lm, query, method, steps)
    print(f"\n{method} query under the torch profiler:\n{table}")
    return table
