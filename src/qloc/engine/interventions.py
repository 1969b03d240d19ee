"""Hooks on knowledge-neuron activations, as context managers that always restore the model.

Every hook sits on the input of the MLP output projection named by the architecture table (a
forward pre-hook on the stock Hugging Face module). ``positions`` selects, per batch row, the one
sequence position the hook acts on (the target position of METHODS.md section 1); ``None`` acts
on every position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .models import LoadedModel

ActivationFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps the activations at the selected positions, [batch, d_ff], to their replacement."""


@contextlib.contextmanager
def activation_hooks(
    lm: LoadedModel, fns: Mapping[int, ActivationFn], positions: torch.Tensor | None = None
) -> Iterator[None]:
    """Replace the neuron activations of the given layers by ``fns[layer](activations)``."""
    handles = []
    try:
        for layer, fn in fns.items():
            handles.append(lm.mlp_out_proj(layer).register_forward_pre_hook(_pre_hook(fn, positions)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(fn: ActivationFn, positions: torch.Tensor | None):
    def hook(module, args):
        hidden = args[0]
        if positions is None:
            return (fn(hidden),) + args[1:]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        cols = positions.to(hidden.device)
        replaced = hidden.clone()
        replaced[rows, cols] = fn(hidden[rows, cols]).to(hidden.dtype)
        return (replaced,) + args[1:]

    return hook


@contextlib.contextmanager
def record_activations(
    lm: LoadedModel, layers: Sequence[int] | None = None, positions: torch.Tensor | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record neuron activations: yields a dict filled with layer -> [batch, d_ff] (or
    [batch, seq, d_ff] when ``positions`` is None) once the model has run."""
    recorded: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> ActivationFn:
        def fn(acts: torch.Tensor) -> torch.Tensor:
            recorded[layer] = acts.detach().clone()
            return acts

        return fn

    layers = range(lm.num_layers) if layers is None else layers
    with activation_hooks(lm, {layer: recorder(layer) for layer in layers}, positions):
        yield recorded


@contextlib.contextmanager
def scale_neurons(
    lm: LoadedModel,
    neurons: Sequence[tuple[int, int]],
    factor: float,
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Multiply the activations of neurons (layer, index) by ``factor`` (0 suppresses, 2 enhances)."""
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(int(layer), []).append(int(index))

    def scaler(indices: list[int]) -> ActivationFn:
        def fn(acts: torch.Tensor) -> torch.Tensor:
            scaled = acts.clone()
            scaled[..., indices] = scaled[..., indices] * factor
            return scaled

        return fn

    with activation_hooks(lm, {layer: scaler(idx) for layer, idx in by_layer.items()}, positions):
        yield
