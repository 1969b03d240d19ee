"""Helpers the test tiers share: tiny randomly initialised models of every family (no download), a
word-level tokenizer built from ParaRel text, the ``qloc`` command as a subprocess, and a sweep
killed midway."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import qloc
from qloc.data.pararel import load_pararel
from qloc.engine.attribution import kn_set

TINY_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
FAMILY_MODEL_TYPES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"]
QLOC = [sys.executable, "-m", "qloc.cli"]
RELATIONS = ["P19", "P36", "P103"]
HOSTILE = "</script><script>alert(1)</script><!-- \u2028"


def tiny_config(model_type: str, vocab_size: int = 512) -> Any:
    """A tiny config of ``model_type`` with random-init-friendly sizes."""
    kwargs: dict[str, Any] = dict(TINY_DIMS, vocab_size=vocab_size, max_position_embeddings=128)
    if model_type == "gpt2":
        kwargs = dict(n_embd=32, n_inner=64, n_layer=3, n_head=4, vocab_size=vocab_size, n_positions=128)
    elif model_type in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"):
        kwargs.update(num_key_value_heads=2, head_dim=8)
    if model_type == "gpt_neox":
        kwargs.update(rotary_pct=0.5)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    if model_type.startswith("gemma") and hasattr(config, "sliding_window"):
        config.sliding_window = 16
    return config


def unsupported_family_config() -> Any:
    """A tiny OPT config: a family the architecture table does not hold."""
    return transformers.AutoConfig.for_model(
        "opt",
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        word_embed_proj_dim=16,
    )


def make_tiny_model(model_type: str, tokenizer: Any = None, seed: int = 0) -> qloc.LoadedModel:
    torch.manual_seed(seed)
    vocab = len(tokenizer) if tokenizer is not None else 512
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config(model_type, vocab), attn_implementation="eager"
    )
    # Random init leaves some biases at 0 and norms at 1; perturb everything so that hook and
    # orientation tests cannot pass by symmetry.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return qloc.wrap_model(model, tokenizer, name=f"tiny-{model_type}")


def build_word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary covers the bundled ParaRel's most common words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words: Counter[str] = Counter()
    for fact in load_pararel().facts[::25]:
        for text in fact.queries + (fact.object,):
            words.update(text.split())
    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3}
    for word, _ in words.most_common(1500):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def assert_equivalent(
    engine: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-3, threshold: float = 0.2
):
    scale = float(reference.abs().max())
    assert scale > 0
    assert float((engine - reference).abs().max()) <= tolerance * scale
    # The sets may differ only by neurons sitting on the threshold, where float summation order
    # (e.g. the number of BLAS threads) decides: 0.2000018 vs 0.1999991 x max.
    cut = threshold * float(reference.max())
    differing = set(kn_set(engine, threshold)) ^ set(kn_set(reference, threshold))
    assert all(abs(float(reference[u]) - cut) <= 1e-4 * scale for u in differing), differing


def token_ids(lm, pairs) -> tuple[list[list[int]], list[int]]:
    """Prompt ids (special tokens included) and answer token 0 of (prompt, answer) pairs."""
    prompts = [lm.tokenizer(p).input_ids for p, _ in pairs]
    return prompts, [lm.tokenizer(" " + a, add_special_tokens=False).input_ids[0] for _, a in pairs]


def direct_scores(lm, prompt, answer):
    """Probability and rank of answer token 0 and the teacher-forced log-probability, one
    unbatched forward pass without qloc's batching."""
    prompt_ids = lm.tokenizer(prompt).input_ids
    answer_ids = lm.tokenizer(" " + answer, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    first = logprobs[len(prompt_ids) - 1]
    total = sum(float(logprobs[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(answer_ids))
    return float(first[answer_ids[0]].exp()), int((first > first[answer_ids[0]]).sum()), total


def localize_args(model: Path | str, run_dir: Path, *extra: str | Path) -> list[str]:
    """``qloc localize`` of a tiny model: IG at 3 steps on the CPU, quiet; ``extra`` options last
    (a later ``--methods`` overrides IG)."""
    return [
        "localize",
        "--model",
        str(model),
        "--run-dir",
        str(run_dir),
        "--methods",
        "ig",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--quiet",
        *map(str, extra),
    ]


def localize_tiny(model: Path | str, run_dir: Path, *extra: str | Path) -> None:
    """A localize run of a tiny model for the studies that read one (fails the test if it fails)."""
    result = run_cli(*localize_args(model, run_dir, *extra))
    assert result.returncode == 0, result.stderr[-2000:]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qloc.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@dataclass
class Result:
    """What a ``qloc`` command run in this process (the ``qloc_cli`` fixture) gave."""

    code: int
    out: str
    err: str


def assert_refused(result: Result, *fragments: str) -> str:
    """Exit status 2 and exactly one error line, naming every fragment; returns the line."""
    assert result.code == 2, result.err[-3000:]
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _done_units(run_dir) -> int:
    try:
        with sqlite3.connect(run_dir / "qloc.sqlite", timeout=5) as db:
            return db.execute("SELECT count(*) FROM units").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def kill_midway(command: list[str], run_dir, units: int, timeout: float = 300) -> int:
    """Start a sweep, ``kill -9`` it once ``units`` units are stored; the units stored then."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while _done_units(run_dir) < units and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, (
        f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _done_units(run_dir)
