"""The models the GPU benchmark runs, their queries and tokenizer, and its timers."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

import qloc
from qloc.engine.models import LoadedModel

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
SMOLLM2_REFERENCE = Path(__file__).resolve().parents[1] / "smollm2_seeded_reference.json"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "eos_token": "[EOS]", "mask_token": "[MASK]"}
TOP_STORED = 32  # neurons per query whose CPU scores the reference file keeps
KN_THRESHOLD = 0.2


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matrix-product rate of this device and dtype: the ceiling the engine is held against."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 10 if device.type == "cuda" else 3
    _, seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * size**3 * repeats / seconds / 1e12
