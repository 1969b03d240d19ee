"""Model loading: built-ins, GGUF conversion cache, local directories, and bad model inputs."""

import pytest
import torch

import qloc
from qloc.errors import QlocError
from tests.helpers import unsupported_family_config


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
    config = unsupported_family_config()
    config.save_pretrained(tmp_path)  # no weights: the family check must come first
    with pytest.raises(qloc.UnsupportedArchitectureError, match="'opt'"):
        qloc.load_model(str(tmp_path), device="cpu")


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
