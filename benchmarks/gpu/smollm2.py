"""A model of smollm2-135m's exact configuration with seeded weights (smollm2's own are too large to
travel to the GPU machine): the CPU's reference scores, and a device's run checked against them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

import qloc
from benchmarks.gpu.models import (
    KN_THRESHOLD,
    TOP_STORED,
    eight_token_queries,
    seeded_model,
    vocabulary_of,
    weights_digest,
    word_tokenizer,
)
from benchmarks.gpu.report import versions
from qloc.engine.attribution import attribute
from qloc.engine.models import LoadedModel


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
