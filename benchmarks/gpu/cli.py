"""The GPU benchmark's command line: arguments, and the run that survives a part's failure."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers

import benchmarks.gpu
from benchmarks.gpu.measure import batch_rows_estimate, exact_cpu_peaks
from benchmarks.gpu.models import (
    H200_BYTES,
    LLAMA3_8B_PARAMETERS,
    PROMPT_TOKENS,
    SMOLLM2_REFERENCE,
    eight_token_queries,
    llama3_8b_shape,
    matmul_tflops,
    timed,
    vocabulary_of,
    word_tokenizer,
)
from benchmarks.gpu.report import (
    estimate_pararel,
    gib,
    machine,
    print_profile,
    print_smollm2,
    run_in_flight,
    run_methods,
    run_row_memory,
    write_json,
)
from benchmarks.gpu.smollm2 import check_smollm2_reference, make_smollm2_reference
from qloc.engine.attribution import DEFAULT_STEPS
from qloc.engine.models import resolve_dtype


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=benchmarks.gpu.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the 8B depth)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--methods", default="ig,amig,sig")
    parser.add_argument("--reference-layers", type=int, default=4, help="layers the reference is timed on")
    parser.add_argument("--in-flight", type=int, nargs="*", default=[2, 4], help="model replicas run at once")
    parser.add_argument("--profile", choices=["ig", "amig", "sig"], help="profile one query of this method")
    parser.add_argument(
        "--smollm2-reference",
        type=Path,
        default=SMOLLM2_REFERENCE,
        help="CPU reference of the seeded smollm2-shape model to check against ('' skips)",
    )
    parser.add_argument("--make-smollm2-reference", action="store_true", help="write --smollm2-reference")
    parser.add_argument("--dry-run", action="store_true", help="only default_batch_rows on an H200")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # random weights leave completeness residuals that are no news here
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for the comparison with the CPU
    results: dict[str, Any] = dict(machine=machine(device), args={k: str(v) for k, v in vars(args).items()})
    print(", ".join(f"{k} {v}" for k, v in results["machine"].items()))

    dry = batch_rows_estimate(32, dtype, H200_BYTES, LLAMA3_8B_PARAMETERS * torch.finfo(dtype).bits // 8)
    results["h200_batch_rows_estimate"] = dry
    print(
        f"default_batch_rows for the 8B shape in {args.dtype} on an H200 ({gib(dry['free_bytes'])} free): "
        f"{dry['batch_rows']} rows, {dry['bytes_per_row'] / 2**20:.1f} MiB estimated per row"
    )
    if args.dry_run:
        write_json(args.json, results)
        return
    if args.make_smollm2_reference:
        path = args.smollm2_reference
        reference = make_smollm2_reference(path, args.queries, args.steps, args.methods.split(","))
        print(
            f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB), "
            f"weights sha256 {reference['weights_sha256'][:16]}"
        )
        return

    # The GPU machine is lent for minutes: a part that fails records its error and the rest still run,
    # and the JSON is rewritten after each part, so a run stopped at its time limit keeps what it had.
    save = partial(write_json, args.json, results)
    shape: dict[str, Any] = {}
    results["llama3_8b_shape"] = shape
    attempt(
        results,
        "llama3_8b_shape",
        partial(measure_llama3_8b_shape, args, dtype, dry["bytes_per_row"], shape, save),
        save,
    )
    if args.smollm2_reference.name and args.smollm2_reference.exists():
        attempt(
            results,
            "smollm2_check",
            lambda: print_smollm2(check_smollm2_reference(args.smollm2_reference, device)),
            save,
        )


def measure_llama3_8b_shape(
    args: argparse.Namespace,
    dtype: torch.dtype,
    estimated_per_row: float,
    shape: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any]:
    """Everything measured on the 8B-shape model, into ``shape`` as it goes; the model is freed on
    return."""
    device = torch.device(args.device)
    queries = eight_token_queries(args.queries)
    tokenizer = word_tokenizer(vocabulary_of(text for pair in queries for text in pair))
    lm, build_seconds = timed(device, lambda: llama3_8b_shape(args.layers, dtype, device, tokenizer))
    parameters = sum(p.numel() for p in lm.model.parameters())
    peak_rate = matmul_tflops(device, dtype)
    shape.update(
        layers=args.layers,
        parameters=parameters,
        dtype=args.dtype,
        build_seconds=build_seconds,
        matmul_tflops=peak_rate,
        queries=queries,
    )
    print(
        f"Llama-3-8B shape, {args.layers} layers ({parameters / 1e9:.2f} B parameters, built in "
        f"{build_seconds:.1f} s), {device} {args.dtype}, {torch.get_num_threads()} threads: "
        f"matrix product {peak_rate:.2f} TFLOP/s"
    )
    print(
        f"{len(queries)} queries of {PROMPT_TOKENS} tokens, {args.steps} steps; reference loop timed on "
        f"{min(args.reference_layers, args.layers)} of {args.layers} layers and extrapolated linearly"
    )

    if device.type == "cpu":
        exact_cpu_peaks()  # before the first peak is measured, as the peaks of row memory need
    shape["methods"] = run_methods(lm, queries, args, peak_rate)
    if {"ig", "amig", "sig"} <= shape["methods"].keys():
        shape["estimates"] = estimate_pararel(shape["methods"], args.layers)
    save()
    if "ig" in shape["methods"] and args.in_flight:
        ig_seconds = shape["methods"]["ig"]["engine"]["seconds_per_query"]
        attempt(shape, "in_flight", lambda: run_in_flight(lm, queries, args, ig_seconds), save)
    attempt(shape, "row_memory", lambda: run_row_memory(lm, args.steps, estimated_per_row), save)
    if args.profile:
        attempt(shape, "profile", lambda: print_profile(lm, queries[0], args.profile, args.steps), save)
    return shape


def attempt(store: dict[str, Any], key: str, measure: Callable[[], Any], save: Callable[[], None]) -> None:
    """store[key] = measure(), or store[key + "_error"] = the error it raised; then save()."""
    try:
        store[key] = measure()
    except Exception as error:  # noqa: BLE001 - any failure of one part is reported, not fatal
        store[key + "_error"] = repr(error)
        print(f"\n{key} failed: {error!r}")
    save()
