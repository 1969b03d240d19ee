"""Model loading: built-ins, GGUF conversion cache, local directories, and bad model inputs."""

from pathlib import Path

import numpy as np

from tests.helpers import run_cli


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


def test_models_command_lists_builtins():
    result = run_cli("models", "--json")
    assert result.returncode == 0
    names = {row["name"] for row in __import__("json").loads(result.stdout)}
    assert names == {"smollm2-135m", "gemma3-270m"}
