"""Model loading: built-ins, GGUF conversion cache, local directories, and bad model inputs."""

import pytest
import torch
import transformers

import qloc
from qloc.engine import gguf


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    """The cache entry appears only complete: a crash while writing leaves nothing behind."""
    if not qloc.BUILTIN_MODELS["smollm2-135m"].installed():
        pytest.skip("smollm2-135m is not installed")
    monkeypatch.setenv("QLOC_CACHE", str(tmp_path))

    def crash(model, directory):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_save_dequantized", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf.convert_gguf(gguf.BUILTIN_MODELS["smollm2-135m"].locate(tmp_path))
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.real_model
def test_gguf_round_trip_gives_identical_logits(smollm2):
    """The cached safetensors conversion holds exactly the weights transformers de-quantises."""
    path = gguf.BUILTIN_MODELS["smollm2-135m"].locate(gguf.cache_dir())
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    ids = smollm2.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2.model(ids).logits)
    converted = dict(smollm2.model.named_parameters())
    for name, param in direct.named_parameters():
        assert torch.equal(param, converted[name]), name
