"""Model loading: built-ins, GGUF conversion cache, local directories, and bad model inputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import qloc
from qloc.engine import models
from qloc.errors import QlocError


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qloc.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def write_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_local_directory_loads_with_its_tokenizer(tiny_model_dir):
    lm = qloc.load_model(str(tiny_model_dir), device="cpu")
    assert lm.arch.family == "llama" and lm.num_layers == 3 and lm.d_ff == 64
    assert lm.describe()["model_type"] == "llama"
    assert lm.tokenizer(" Paris", add_special_tokens=False).input_ids


def test_dtype_option(tiny_model_dir):
    lm = qloc.load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    score = qloc.score_cloze(lm, ["Paris is the capital of"], ["France"])[0]
    assert 0 < score.prob < 1


@pytest.mark.parametrize(
    "model, message",
    [
        ("no-such-model-anywhere", "unknown model 'no-such-model-anywhere'"),
        ("/no/such/file.gguf", "GGUF file '/no/such/file.gguf' does not exist"),
        ("./no/such/dir", "neither a directory nor a .gguf file"),
    ],
)
def test_unknown_models_are_named(model, message):
    with pytest.raises(QlocError, match=message):
        qloc.load_model(model, device="cpu")


def test_bad_dtype_and_device_are_named():
    with pytest.raises(QlocError, match="float64"):
        qloc.load_model("smollm2-135m", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(QlocError, match="CUDA is not available"):
            qloc.load_model("smollm2-135m", device="cuda")


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(QlocError, match="no config.json"):
        qloc.load_model(str(tmp_path))


def test_unsupported_family_directory_fails_before_loading_weights(tmp_path):
    config = transformers.AutoConfig.for_model(
        "opt",
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        word_embed_proj_dim=16,
    )
    config.save_pretrained(tmp_path)  # no weights: the family check must come first
    with pytest.raises(qloc.UnsupportedArchitectureError, match="'opt'"):
        qloc.load_model(str(tmp_path), device="cpu")


def test_gguf_of_unsupported_architecture_is_named_from_cli(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", "unknownarch")
    result = run_cli(
        "cloze",
        "--model",
        str(path),
        "--prompt",
        "a",
        "--answer",
        "b",
        env={"QLOC_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2
    assert "odd.gguf" in result.stderr and "'unknownarch'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").glob("models/*")), "a failed conversion left a cache entry"


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    """The cache entry appears only complete: a crash while writing leaves nothing behind."""
    if not qloc.BUILTIN_MODELS["smollm2-135m"].installed():
        pytest.skip("smollm2-135m is not installed")
    monkeypatch.setenv("QLOC_CACHE", str(tmp_path))

    def crash(model, directory):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_save_dequantized", crash)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(models.BUILTIN_MODELS["smollm2-135m"].locate(tmp_path))
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.real_model
def test_gguf_round_trip_gives_identical_logits(smollm2):
    """The cached safetensors conversion holds exactly the weights transformers de-quantises."""
    path = models.BUILTIN_MODELS["smollm2-135m"].locate(models.cache_dir())
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    ids = smollm2.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2.model(ids).logits)
    converted = dict(smollm2.model.named_parameters())
    for name, param in direct.named_parameters():
        assert torch.equal(param, converted[name]), name


def test_models_command_lists_builtins():
    result = run_cli("models", "--json")
    assert result.returncode == 0
    names = {row["name"] for row in __import__("json").loads(result.stdout)}
    assert names == {"smollm2-135m", "gemma3-270m"}


def test_device_map_loads_through_accelerate_and_attributes_the_same(tiny_model_dir):
    """``--device map`` (accelerate's device_map="auto") gives the same scores as a plain load.
    Without GPUs accelerate keeps everything on the CPU, so the split itself is not exercised here."""
    plain = qloc.load_model(str(tiny_model_dir), device="cpu")
    mapped = qloc.load_model(str(tiny_model_dir), device="map")
    for method in ("ig", "amig"):
        expected = qloc.attribute(plain, "The capital of France is", "Paris", method, steps=3).scores
        torch.testing.assert_close(
            qloc.attribute(mapped, "The capital of France is", "Paris", method, steps=3).scores, expected
        )
