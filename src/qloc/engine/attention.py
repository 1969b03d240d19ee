"""Post-softmax attention probabilities as an intervention point, for every family in the table.

transformers computes attention through its attention interface: each attention module looks up
the function registered under ``config._attn_implementation`` ("sdpa", "flash_attention_2",
"eager", ...) and calls it with the projected queries, keys and values. qloc registers one more
function, ``qloc_probe``, that computes attention the eager way (the probabilities exist as a
tensor) and passes them through an optional per-layer function before they weight the values.
:func:`attention_probe` switches a model to it for the duration of a ``with`` block and back
afterwards, so SDPA and flash users need not reload their model: the commands that touch attention
switch automatically. Nothing of the model is re-implemented: projections, rotary embeddings,
GQA layout, soft-capping and sliding-window masks all stay the stock modules' (the probe is only
the ``softmax(q k^T) v`` step, with the mask the model builds for eager attention).

Interventions are context managers that always restore the model: :func:`attention_hooks`
(replace probabilities by a function of them), :func:`scale_attention` (multiply chosen
(layer, head, query position, key position) entries, no renormalisation) and
:func:`record_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import QlocError
from .models import LoadedModel

PROBE_IMPLEMENTATION = "qloc_probe"
_FN_ATTRIBUTE = "_qloc_probability_fn"
_CALLS_ATTRIBUTE = "_qloc_probe_calls"

ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps one layer's attention probabilities [batch, heads, query, key] to their replacement."""

Synapse = tuple[int, int, int, int]
"""(layer, head, query position, key position) of one attention probability."""


def probed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as the stock eager functions compute it) with a hook on the probabilities."""
    if kwargs.get("s_aux") is not None:
        raise QlocError(
            f"{type(module).__name__} uses attention sinks, which qloc's attention probe does not model"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        logits = logits + attention_mask
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    fn = getattr(module, _FN_ATTRIBUTE, None)
    if fn is not None:
        probs = fn(probs)
    if hasattr(module, _CALLS_ATTRIBUTE):
        setattr(module, _CALLS_ATTRIBUTE, getattr(module, _CALLS_ATTRIBUTE) + 1)
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, probs


def _register() -> None:
    if PROBE_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(PROBE_IMPLEMENTATION, probed_attention)
        # The probe adds the mask to the logits, as eager attention does: build it the eager way.
        ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE_IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def attention_probe(lm: LoadedModel) -> Iterator[None]:
    """Route every attention module of ``lm`` through the probe; the previous implementation
    (sdpa, flash, eager) is restored on exit. Nested use is a no-op."""
    _register()
    config = lm.config
    previous = config._attn_implementation
    if previous == PROBE_IMPLEMENTATION:
        yield
        return
    modules = [lm.attention(layer) for layer in range(lm.num_layers)]
    config._attn_implementation_internal = PROBE_IMPLEMENTATION
    for module in modules:
        setattr(module, _CALLS_ATTRIBUTE, 0)
    try:
        yield
        unreached = [layer for layer, module in enumerate(modules) if getattr(module, _CALLS_ATTRIBUTE) == 0]
        if any(getattr(m, _CALLS_ATTRIBUTE) for m in modules) and unreached:
            raise QlocError(
                f"{lm.name!r} ({config.model_type}): the attention of layers {unreached} did not go through "
                "transformers' attention interface, so qloc cannot reach its probabilities"
            )
    finally:
        config._attn_implementation_internal = previous
        for module in modules:
            delattr(module, _CALLS_ATTRIBUTE)


@contextlib.contextmanager
def attention_hooks(lm: LoadedModel, fns: Mapping[int, ProbabilityFn]) -> Iterator[None]:
    """Replace the attention probabilities of the given layers by ``fns[layer](probabilities)``."""
    modules = {layer: lm.attention(layer) for layer in fns}
    with attention_probe(lm):
        try:
            for layer, fn in fns.items():
                if hasattr(modules[layer], _FN_ATTRIBUTE):
                    raise QlocError(f"layer {layer}'s attention already has a probability hook")
                setattr(modules[layer], _FN_ATTRIBUTE, fn)
            yield
        finally:
            for module in modules.values():
                if hasattr(module, _FN_ATTRIBUTE):
                    delattr(module, _FN_ATTRIBUTE)


@contextlib.contextmanager
def record_attention(
    lm: LoadedModel, layers: Sequence[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict filled with layer -> probabilities [batch, heads, query, key] once the model ran."""
    recorded: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> ProbabilityFn:
        def fn(probs: torch.Tensor) -> torch.Tensor:
            recorded[layer] = probs.detach().clone()
            return probs

        return fn

    layers = range(lm.num_layers) if layers is None else layers
    with attention_hooks(lm, {layer: recorder(layer) for layer in layers}):
        yield recorded


@contextlib.contextmanager
def scale_attention(lm: LoadedModel, synapses: Sequence[Synapse], factor: float) -> Iterator[None]:
    """Multiply the probabilities at (layer, head, query position, key position) by ``factor``
    (0 suppresses, 2 enhances; no renormalisation: METHODS.md section 7), in every batch row."""
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for layer, head, i, j in synapses:
        by_layer.setdefault(int(layer), []).append((int(head), int(i), int(j)))

    def scaler(entries: list[tuple[int, int, int]]) -> ProbabilityFn:
        heads, rows, cols = (torch.tensor(axis) for axis in zip(*entries))

        def fn(probs: torch.Tensor) -> torch.Tensor:
            if int(rows.max()) >= probs.shape[2] or int(cols.max()) >= probs.shape[3]:
                raise QlocError(
                    f"synapse positions up to ({int(rows.max())}, {int(cols.max())}) lie outside the "
                    f"{probs.shape[2]} x {probs.shape[3]} attention of this input"
                )
            h, i, j = heads.to(probs.device), rows.to(probs.device), cols.to(probs.device)
            scaled = probs.clone()
            scaled[:, h, i, j] = probs[:, h, i, j] * factor
            return scaled

        return fn

    with attention_hooks(lm, {layer: scaler(entries) for layer, entries in by_layer.items()}):
        yield
