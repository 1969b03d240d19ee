"""The attribution engine at the paper's scale: Llama-3-8B's shape with random weights, on a GPU.

    python benchmarks/gpu.py [--device cuda] [--layers 32] [--dtype bfloat16] [--queries 3] [--steps 20]
                             [--reference-layers 4] [--in-flight 2 4] [--profile amig] [--json OUT]
    python benchmarks/gpu.py --dry-run                   # rows default_batch_rows picks on a 141 GB H200
    python benchmarks/gpu.py --make-smollm2-reference    # CPU only: writes SMOLLM2_REFERENCE

Builds a model of Llama-3-8B's configuration (32 layers, d_model 4096, d_ff 14336, 32 heads / 8 KV
heads, vocabulary 128,256) straight on the device in bf16 with random weights: the same compute as the
real model, no download. Prompts are 8-word ParaRel queries under a word-level tokenizer, so each is
exactly 8 tokens. Measures, side by side in one run:

- IG, AMIG and SIG seconds per query, the batch rows the engine chose, peak memory, and the sustained
  rate from the cost model in benchmarks/throughput.py against a bf16 matrix product measured here;
- the per-layer reference loop (tests/reference_attribution.py) on the first --reference-layers
  layers, extrapolated linearly to all of them, for the speed-up ratio;
- queries per second back to back and with several model replicas in flight, one thread and one CUDA
  stream each;
- the memory one row costs per layer it runs and in the output head, solved from three pass sizes,
  against default_batch_rows' estimate;
- a model of smollm2-135m's exact configuration with seeded weights (smollm2's own weights are too
  large to travel to the GPU machine): its fp32 scores against the CPU's stored in SMOLLM2_REFERENCE,
  and the KN sets of its bf16 run against fp32's.

On the CPU, --layers 2 proves the script end to end. Figures and how to run it on the GPU machine:
benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import hashlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
import transformers

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # the repository, for tests.reference_attribution
sys.path.insert(0, str(BENCHMARKS))
from tests.reference_attribution import reference_scores  # noqa: E402

import qloc  # noqa: E402
from qloc.engine.attribution import attribute  # noqa: E402
from qloc.engine.models import LoadedModel  # noqa: E402
from qloc.engine.paths import PathIntegrator, default_batch_rows, frozen_parameters, integration_points  # noqa: E402
from qloc.engine.sites import NEURONS  # noqa: E402
from throughput import PARAREL_FACTS, PARAREL_QUERIES, Shape, query_flops  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128_256,
    hidden_size=4096,
    intermediate_size=14_336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
    tie_word_embeddings=False,
)
LLAMA3_8B_PARAMETERS = 8_030_261_248
PROMPT_TOKENS = 8
H200_BYTES = 143_771 * 2**20  # what nvidia-smi reports for the H200 this workplace lends
CUDA_CONTEXT_BYTES = 2**29  # the CUDA context and cuBLAS workspaces, about half a GiB
SMOLLM2_REFERENCE = BENCHMARKS / "smollm2_seeded_reference.json"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "eos_token": "[EOS]", "mask_token": "[MASK]"}
TOP_STORED = 32  # neurons per query whose CPU scores the reference file keeps
KN_THRESHOLD = 0.2


# ---------------------------------------------------------------------------------------------------
# Queries, tokenizer and models


def eight_token_queries(count: int) -> list[tuple[str, str]]:
    """The first ``count`` ParaRel queries of exactly 8 words with a one-word answer, one per
    relation (in the bundled data's order), so that every prompt is 8 tokens and every answer 1."""
    chosen: dict[str, tuple[str, str]] = {}
    for fact in qloc.load_pararel().facts:
        if fact.relation in chosen or len(fact.object.split()) != 1:
            continue
        prompt = next((q for q in fact.queries if len(q.split()) == PROMPT_TOKENS), None)
        if prompt is not None:
            chosen[fact.relation] = (prompt, fact.object)
        if len(chosen) == count:
            break
    return list(chosen.values())


def vocabulary_of(texts: Iterable[str]) -> list[str]:
    """Special tokens, then every whitespace word in order of first appearance."""
    vocabulary = dict.fromkeys(SPECIAL_TOKENS.values())
    for text in texts:
        vocabulary.update(dict.fromkeys(text.split()))
    return list(vocabulary)


def word_tokenizer(vocabulary: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    """One token per whitespace word and no BOS: AMIG replaces words by [EOS], SIG by [MASK], as they
    would with a real tokenizer's special tokens. Token ids are the vocabulary's indices."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def llama3_8b_shape(layers: int, dtype: torch.dtype, device: torch.device, tokenizer: Any) -> LoadedModel:
    """Llama-3-8B's configuration (first ``layers`` layers) with random weights, allocated on
    ``device`` in ``dtype`` from the start: no fp32 copy on the CPU first."""
    config = transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return qloc.wrap_model(model, tokenizer, name=f"llama3-8b-shape-{layers}-layers")


def seeded_model(config_kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    """A Llama of the given configuration in fp32 on the CPU whose every parameter is drawn from one
    seeded generator in a fixed order, so that another machine (other torch, other module
    initialisers) rebuilds the same weights; ``weights_digest`` verifies it did."""
    config = transformers.LlamaConfig(**config_kwargs)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator)
            # Norm gains near 1 and matrices at the configuration's initialiser scale: a working
            # network, though not a trained one.
            parameter.copy_(1 + 0.1 * noise if parameter.dim() == 1 else config.initializer_range * noise)
    return model


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FirstLayers(LoadedModel):
    """The whole model as the reference loop sees it when told it has only ``layer_count`` layers:
    each per-layer iteration still runs the full depth, so timing a few layers extrapolates to all."""

    layer_count: int = 0

    @property
    def num_layers(self) -> int:
        return self.layer_count


def first_layers(lm: LoadedModel, count: int) -> FirstLayers:
    return FirstLayers(**{f.name: getattr(lm, f.name) for f in fields(LoadedModel)}, layer_count=count)


# ---------------------------------------------------------------------------------------------------
# Meters


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class PeakMemory:
    """Peak memory above the level at ``reset``: the CUDA allocator's count on a GPU; on the CPU the
    process's resident-set high-water mark, which Linux resets on request."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        if device.type == "cpu":
            # glibc serves blocks below its mmap threshold (128 KiB, rising to 32 MiB as blocks are
            # freed) from a heap that stays resident, so a pass reusing them would not raise the
            # high-water mark. A fixed 16 KiB threshold maps every tensor of a batch of rows on its
            # own and returns it when freed (M_MMAP_THRESHOLD is -3).
            ctypes.CDLL("libc.so.6").mallopt(-3, 16 * 1024)

    def reset(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_bytes("VmRSS")

    def peak(self) -> int:
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_bytes("VmHWM") - self.base


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matrix-product rate of this device and dtype: the ceiling the engine is held against."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 10 if device.type == "cuda" else 3
    _, seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * size**3 * repeats / seconds / 1e12


# ---------------------------------------------------------------------------------------------------
# Measurements


def measure_engine(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], method: str, steps: int, meter: PeakMemory
) -> dict[str, Any]:
    attribute(lm, *queries[0], method, steps=steps)  # warm-up: kernels, handles, the allocator's pool
    runs = []
    for prompt, answer in queries:
        batch_rows = default_batch_rows(lm)  # what the engine is about to choose: nothing allocates between
        meter.reset()
        result, seconds = timed(
            lm.device, lambda prompt=prompt, answer=answer: attribute(lm, prompt, answer, method, steps=steps)
        )
        total_rows = lm.num_layers * (steps + 1) * result.params["baselines"]
        runs.append(
            dict(
                seconds=seconds,
                batch_rows=batch_rows,
                total_rows=total_rows,
                passes=math.ceil(total_rows / batch_rows),
                peak_bytes=meter.peak(),
            )
        )
    return dict(seconds_per_query=statistics.mean(r["seconds"] for r in runs), runs=runs, last=result)


def measure_reference(
    lm: LoadedModel, queries: Sequence[tuple[str, str]], method: str, steps: int, layers: int
) -> dict[str, Any]:
    """The reference loop over the first ``layers`` layers, its time extrapolated linearly to all: its
    cost is one full-depth batch of ``steps`` sequences per layer (its single clean forward, counted
    L / layers times over, makes the extrapolation a slight overestimate)."""
    view = first_layers(lm, layers)
    reference_scores(view, *queries[0], method, steps=2)  # warm-up
    seconds, scores = [], []
    for prompt, answer in queries:
        score, elapsed = timed(
            lm.device,
            lambda prompt=prompt, answer=answer: reference_scores(view, prompt, answer, method, steps=steps),
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


def measure_row_memory(lm: LoadedModel, prompt_tokens: int, steps: int, meter: PeakMemory) -> dict[str, Any]:
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
                meter.reset()
                PathIntegrator(lm, NEURONS, batch_rows).integrate(clean, None, alphas, weights)
                peaks.append(meter.peak())
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
    the weights, by calling it with the CUDA memory query answered for that card."""
    config = transformers.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    stand_in = SimpleNamespace(
        device=torch.device("cuda"),
        config=config,
        dtype=dtype,
        num_layers=layers,
        d_ff=config.intermediate_size,
    )
    free = total_bytes - weight_bytes - CUDA_CONTEXT_BYTES
    with mock.patch("torch.cuda.mem_get_info", return_value=(free, total_bytes)):
        rows = default_batch_rows(stand_in)
    return dict(total_bytes=total_bytes, free_bytes=free, batch_rows=rows, bytes_per_row=0.5 * free / rows)


def print_profile(lm: LoadedModel, query: tuple[str, str], method: str, steps: int) -> str:
    table = profile_query(lm, query, method, steps)
    print(f"\n{method} query under the torch profiler:\n{table}")
    return table


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


# ---------------------------------------------------------------------------------------------------
# smollm2-135m's configuration with seeded weights: CPU reference and the GPU's comparison


def jaccard(a: Iterable[Sequence[int]], b: Iterable[Sequence[int]]) -> float:
    a, b = {tuple(x) for x in a}, {tuple(x) for x in b}
    return len(a & b) / len(a | b) if a | b else 1.0


def smollm2_config() -> dict[str, Any]:
    """smollm2-135m's configuration as the converted GGUF checkpoint states it, less its provenance."""
    from qloc.engine.gguf import BUILTIN_MODELS, cache_dir, convert_gguf

    directory = convert_gguf(BUILTIN_MODELS["smollm2-135m"].locate(cache_dir()))
    config = transformers.AutoConfig.from_pretrained(directory).to_diff_dict()
    provenance = ("transformers_version", "_model_name_or_path", "dtype", "model_type", "architectures")
    return {k: v for k, v in config.items() if k not in provenance}


def attribute_queries(
    lm: LoadedModel, queries: Sequence[Sequence[str]], methods: Sequence[str], steps: int
) -> dict[str, list[qloc.Attribution]]:
    return {m: [attribute(lm, prompt, answer, m, steps=steps) for prompt, answer in queries] for m in methods}


def kn_jaccards(
    first: dict[str, list[qloc.Attribution]], second: dict[str, list[qloc.Attribution]]
) -> dict[str, list[float]]:
    return {
        m: [jaccard(a.kn_set(KN_THRESHOLD), b.kn_set(KN_THRESHOLD)) for a, b in zip(first[m], second[m])]
        for m in first
    }


def make_smollm2_reference(path: Path, queries: int, steps: int, methods: Sequence[str]) -> dict[str, Any]:
    """CPU fp32 scores of the seeded smollm2-shape model: the top neurons, the KN set and the largest
    score of each (method, query), with the weights' digest; and, for context, how far the CPU's own
    bf16 run's KN sets move from fp32's on these weights and on smollm2's real ones."""
    chosen = eight_token_queries(queries)
    vocabulary = vocabulary_of(text for pair in chosen for text in pair)
    config, seed = smollm2_config(), 0
    model = seeded_model(config, seed)
    digest = weights_digest(model)
    lm = qloc.wrap_model(model, word_tokenizer(vocabulary), name="smollm2-shape-seeded")
    fp32 = attribute_queries(lm, chosen, methods, steps)
    lm.model.to(torch.bfloat16)
    bf16 = attribute_queries(lm, chosen, methods, steps)
    real = qloc.load_model("smollm2-135m", device="cpu")
    real_fp32 = attribute_queries(real, chosen, methods, steps)
    real.model.to(torch.bfloat16)
    real_bf16 = attribute_queries(real, chosen, methods, steps)
    reference = dict(
        config=config,
        seed=seed,
        weights_sha256=digest,
        steps=steps,
        threshold=KN_THRESHOLD,
        vocabulary=vocabulary,
        queries=chosen,
        made_with=versions(),
        fp32={
            m: [
                dict(
                    max_score=float(a.scores.max()),
                    top=[list(t) for t in a.top(TOP_STORED)],
                    kn_set=a.kn_set(KN_THRESHOLD),
                )
                for a in runs
            ]
            for m, runs in fp32.items()
        },
        cpu_bf16_jaccard=kn_jaccards(fp32, bf16),
        real_smollm2_cpu_bf16_jaccard=kn_jaccards(real_fp32, real_bf16),
    )
    path.write_text(json.dumps(reference, indent=None, separators=(",", ":")) + "\n")
    return reference


def check_smollm2_reference(path: Path, device: torch.device) -> dict[str, Any]:
    """This device's fp32 scores of the seeded smollm2-shape model against the CPU's stored ones, and
    its bf16 run's KN sets against its fp32 run's (and the CPU's)."""
    stored = json.loads(path.read_text())
    model = seeded_model(stored["config"], stored["seed"])
    same_weights = weights_digest(model) == stored["weights_sha256"]
    lm = qloc.wrap_model(model.to(device), word_tokenizer(stored["vocabulary"]), name="smollm2-shape-seeded")
    methods = list(stored["fp32"])
    fp32 = attribute_queries(lm, stored["queries"], methods, stored["steps"])
    lm.model.to(torch.bfloat16)
    bf16 = attribute_queries(lm, stored["queries"], methods, stored["steps"])
    threshold = stored["threshold"]
    report: dict[str, Any] = dict(same_weights=same_weights, methods={})
    for method in methods:
        rows = []
        for cpu, here, half in zip(stored["fp32"][method], fp32[method], bf16[method]):
            scale = abs(cpu["max_score"])
            top_diff = max(abs(float(here.scores[layer, i]) - s) for layer, i, s in cpu["top"]) / scale
            rows.append(
                dict(
                    largest_score_rel_diff=abs(float(here.scores.max()) - cpu["max_score"]) / scale,
                    top_scores_max_diff_over_max=top_diff,
                    fp32_kn_jaccard_with_cpu=jaccard(here.kn_set(threshold), cpu["kn_set"]),
                    kn_set_size=len(cpu["kn_set"]),
                    bf16_kn_jaccard_with_fp32=jaccard(half.kn_set(threshold), here.kn_set(threshold)),
                    bf16_kn_jaccard_with_cpu_fp32=jaccard(half.kn_set(threshold), cpu["kn_set"]),
                )
            )
        report["methods"][method] = rows
    report["cpu_bf16_jaccard"] = stored["cpu_bf16_jaccard"]
    report["real_smollm2_cpu_bf16_jaccard"] = stored["real_smollm2_cpu_bf16_jaccard"]
    return report


# ---------------------------------------------------------------------------------------------------
# Report


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
    meter = PeakMemory(lm.device)
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
        engine = measure_engine(lm, queries, method, args.steps, meter)
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
    meter = PeakMemory(lm.device)
    fits = []
    print(
        f"\nmemory per row, solved from three IG pass sizes; default_batch_rows estimates "
        f"{estimated_per_row / 2**20:.1f} MiB per row of the 32-layer shape:"
    )
    for prompt_tokens in (PROMPT_TOKENS, 64):
        fit = measure_row_memory(lm, prompt_tokens, steps, meter)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the 8B depth)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
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
    device, dtype = torch.device(args.device), qloc.engine.models.resolve_dtype(args.dtype)
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


if __name__ == "__main__":
    main()
