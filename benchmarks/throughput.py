"""Sweep throughput: the same localize sweep locally and on Ray, side by side, and a per-fact cost
model that extrapolates to a full ParaRel run of an 8B model.

    .venv/bin/python benchmarks/throughput.py [--model smollm2-135m] [--facts 4] [--workers 2]
                                              [--methods ig,amig] [--gpu-tflops 300] [--gpus 8]

Runs ``qloc localize`` on the same seeded facts (1 per relation) with ``--executor local`` and with
``--executor ray --workers N`` into fresh run directories, and prints facts per hour of each (wall
time of the whole command, start-up included) and their ratio. Then the cost model: the engine's
work per query in FLOPs (rows x the layers each row runs, forward + input-gradient backward, plus
the output head), calibrated by the stored per-query seconds of the local run, and applied to
Llama-3-8B's shape with an assumed sustained GPU rate (``--gpu-tflops``; no GPU measured it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import qloc
from qloc.engine.attribution import DEFAULT_STEPS

PARAREL_FACTS, PARAREL_QUERIES = 25_304, 160_934  # facts with >= 2 usable queries, and their queries


@dataclass(frozen=True)
class Shape:
    layers: int
    d_model: int
    d_ff: int
    vocab: int
    gated: bool = True

    @property
    def layer_flops(self) -> float:
        """Forward FLOPs of one token through one decoder layer's weights (attention ~4 d^2 with
        GQA taken as full heads, MLP 3 d d_ff gated or 2 d d_ff)."""
        return 2 * (4 * self.d_model**2 + (3 if self.gated else 2) * self.d_model * self.d_ff)


LLAMA3_8B = Shape(layers=32, d_model=4096, d_ff=14336, vocab=128256)


def query_flops(shape: Shape, method: str, steps: int = DEFAULT_STEPS, prompt_tokens: int = 8) -> float:
    """Engine FLOPs of one query and answer token. Each (layer l, step) row runs layers l..L-1 at one
    position (the prefix comes from the cache) forward and backward (input gradients only, about
    the forward's cost again), then the head; AMIG/SIG add their baseline forwards; SIG integrates
    one path per prompt word."""
    rows_layers = (steps + 1) * shape.layers * (shape.layers + 1) / 2
    rows = (steps + 1) * shape.layers
    path = 2 * (rows_layers * shape.layer_flops + rows * 2 * shape.d_model * shape.vocab)
    clean = prompt_tokens * (shape.layers * shape.layer_flops + 2 * shape.d_model * shape.vocab)
    if method == "ig":
        return path + clean
    if method == "amig":
        return path + clean + prompt_tokens * prompt_tokens * shape.layers * shape.layer_flops
    if method == "sig":
        return prompt_tokens * path + clean + prompt_tokens * prompt_tokens * shape.layers * shape.layer_flops
    raise ValueError(method)


def run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="ig,amig")
    parser.add_argument(
        "--gpu-tflops", type=float, default=300.0, help="assumed sustained bf16 TFLOP/s of one GPU"
    )
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = [
            sys.executable,
            "-m",
            "qloc.cli",
            "localize",
            "--model",
            args.model,
            "--methods",
            args.methods,
            "--facts-per-relation",
            "1",
            "--limit",
            str(args.facts),
            "--seed",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ]
        local = run(base + ["--run-dir", f"{tmp}/local"])
        distributed = run(
            base + ["--run-dir", f"{tmp}/ray", "--executor", "ray", "--workers", str(args.workers)]
        )
        with qloc.RunStore.open_existing(f"{tmp}/local") as store:
            rows = store.frame("kn_sets")
        lm = qloc.load_model(args.model, device="cpu")

    print(
        f"{args.facts} facts of {args.model}, methods {args.methods}, "
        f"{len(rows) // len(args.methods.split(','))} queries"
    )
    print(f"local (one process, all cores):   {local:7.1f} s   {3600 * args.facts / local:6.1f} facts/hour")
    print(
        f"ray ({args.workers} CPU workers):         {distributed:7.1f} s   "
        f"{3600 * args.facts / distributed:6.1f} facts/hour"
    )
    print(f"ray / local throughput: {local / distributed:.2f}")

    config = lm.config
    shape = Shape(lm.num_layers, config.hidden_size, lm.d_ff, config.vocab_size)
    prompt_tokens = round(rows["prompt"].map(lambda p: len(lm.tokenizer(p)["input_ids"])).mean())
    print("\ncost model (FLOPs per query and answer token; prompt of", prompt_tokens, "tokens):")
    full_8b = 0.0
    for method, group in rows.groupby("method"):
        measured = group["seconds"].mean()
        flops = query_flops(shape, method, prompt_tokens=prompt_tokens)
        rate = flops / measured
        big = query_flops(LLAMA3_8B, method, prompt_tokens=prompt_tokens)
        full_8b += big * PARAREL_QUERIES
        print(
            f"  {method:5s} {args.model}: {flops / 1e12:7.3f} TFLOP, measured {measured:6.2f} s/query -> "
            f"{rate / 1e9:6.1f} GFLOP/s here;"
            f"  Llama-3-8B: {big / 1e12:7.2f} TFLOP"
        )
    hours = full_8b / (args.gpus * args.gpu_tflops * 1e12) / 3600
    print(
        f"\nfull ParaRel ({PARAREL_FACTS} facts, {PARAREL_QUERIES} queries), methods {args.methods}, "
        f"Llama-3-8B, first answer token: {full_8b / 1e18:.1f} EFLOP -> {hours:.1f} h on {args.gpus} GPUs "
        f"at an assumed {args.gpu_tflops:.0f} TFLOP/s each"
        f" ({hours * args.gpus:.0f} GPU-hours)"
    )


if __name__ == "__main__":
    main()
