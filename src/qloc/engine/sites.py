"""The one intervention vocabulary: record, scale or replace what a model computes at a site.

A site is a tensor every decoder layer computes, named in the architecture table
(:data:`qloc.engine.architectures.SiteName`). Two sites are activations that qloc can intercept:

- :data:`NEURONS` (``neuron_activation``): the input of the MLP output projection, [batch, seq,
  d_ff], reached through a forward pre-hook on the stock module. ``positions`` selects, per batch
  row, the one sequence position an intervention acts on (the target position of METHODS.md
  section 1); ``None`` acts on every position. A unit is (layer, neuron).
- :data:`ATTENTION` (``attention_probabilities``): the post-softmax attention, [batch, heads,
  query, key], reached through a registered attention implementation (below). A unit, a synapse,
  is (layer, head, query position, key position).

Each site offers the same three context managers, which always restore the model on exit:
``replace`` (the site's tensor of chosen layers becomes a function of itself), ``record`` and
``scale`` (multiply chosen units by a factor; 0 suppresses, 2 enhances, no renormalisation).
The third site, the value vectors, is a weight: :meth:`qloc.engine.models.LoadedModel.value_vectors`
reads it and :mod:`qloc.engine.editing` writes it.

How attention is reached. transformers computes attention through its attention interface: each
attention module looks up the function registered under ``config._attn_implementation`` ("sdpa",
"flash_attention_2", "eager", ...). qloc registers one more, ``qloc_probe``, that computes
attention the eager way (the probabilities exist as a tensor) and passes them through an optional
per-layer function before they weight the values. :func:`attention_probe` switches a model to it
for a ``with`` block and back, so SDPA and flash users need not reload their model. Nothing of the
model is re-implemented: projections, rotary embeddings, GQA layout, soft-capping and
sliding-window masks all stay the stock modules' (the probe is only the ``softmax(q k^T) v`` step,
with the mask the model builds for eager attention).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import QlocError
from .architectures import SiteName
from .models import LoadedModel

SiteFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a site's tensor of one layer (at the selected positions) to its replacement."""
Synapse = tuple[int, int, int, int]
"""(layer, head, query position, key position) of one attention probability."""

PROBE_IMPLEMENTATION = "qloc_probe"
_FN_ATTRIBUTE = "_qloc_probability_fn"
_CALLS_ATTRIBUTE = "_qloc_probe_calls"


class Site:
    """A site of every decoder layer, and the interventions on it."""

    name: SiteName
    unit_axes: str
    """What a unit's indices after its layer are, for messages."""
    one_position: bool
    """Whether an attribution path acts at one sequence position only (the target): then every
    position before it is the same for all path points and can be computed once."""

    def active(self, lm: LoadedModel) -> contextlib.AbstractContextManager[None]:
        """What must hold for the site to be reachable while a block runs."""
        return contextlib.nullcontext()

    def _attach(
        self, lm: LoadedModel, layer: int, fn: SiteFn, positions: torch.Tensor | None
    ) -> Callable[[], None]:
        """Make ``layer``'s tensor go through ``fn``; returns what undoes it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def replace(
        self, lm: LoadedModel, fns: Mapping[int, SiteFn], positions: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Replace the site's tensor of the given layers by ``fns[layer](tensor)``."""
        undo: list[Callable[[], None]] = []
        with self.active(lm):
            try:
                for layer, fn in fns.items():
                    undo.append(self._attach(lm, layer, fn, positions))
                yield
            finally:
                for detach in reversed(undo):
                    detach()

    @contextlib.contextmanager
    def record(
        self, lm: LoadedModel, layers: Sequence[int] | None = None, positions: torch.Tensor | None = None
    ) -> Iterator[dict[int, torch.Tensor]]:
        """Yields a dict filled with layer -> the site's tensor once the model has run (neurons:
        [batch, d_ff] at ``positions``, or [batch, seq, d_ff] without)."""
        recorded: dict[int, torch.Tensor] = {}

        def recorder(layer: int) -> SiteFn:
            def fn(tensor: torch.Tensor) -> torch.Tensor:
                recorded[layer] = tensor.detach().clone()
                return tensor

            return fn

        chosen = range(lm.num_layers) if layers is None else layers
        with self.replace(lm, {layer: recorder(layer) for layer in chosen}, positions):
            yield recorded

    @contextlib.contextmanager
    def scale(
        self,
        lm: LoadedModel,
        units: Sequence[Sequence[int]],
        factor: float,
        positions: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Multiply the site's entries at ``units`` (layer first, then the site's own indices) by
        ``factor``, in every batch row."""
        by_layer: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for layer, *index in units:
            by_layer[int(layer)].append(tuple(int(i) for i in index))
        scalers = {layer: self._scaler(entries, factor) for layer, entries in by_layer.items()}
        with self.replace(lm, scalers, positions):
            yield

    def _scaler(self, entries: list[tuple[int, ...]], factor: float) -> SiteFn:
        axes = [torch.tensor(axis) for axis in zip(*entries)]
        highest = tuple(int(axis.max()) for axis in axes)

        def fn(tensor: torch.Tensor) -> torch.Tensor:
            sizes = tuple(tensor.shape[-len(axes) :])
            if any(top >= size for top, size in zip(highest, sizes)):
                raise QlocError(
                    f"{self.unit_axes} up to {highest} lie outside the "
                    f"{' x '.join(map(str, sizes))} {self.name} of this input"
                )
            index: tuple[Any, ...] = (Ellipsis, *(axis.to(tensor.device) for axis in axes))
            scaled = tensor.clone()
            scaled[index] = tensor[index] * factor
            return scaled

        return fn


class NeuronSite(Site):
    name = "neuron_activation"
    unit_axes = "neurons"
    one_position = True

    def _attach(
        self, lm: LoadedModel, layer: int, fn: SiteFn, positions: torch.Tensor | None
    ) -> Callable[[], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0]
            if positions is None:
                return (fn(hidden), *args[1:])
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            cols = positions.to(hidden.device)
            replaced = hidden.clone()
            replaced[rows, cols] = fn(hidden[rows, cols]).to(hidden.dtype)
            return (replaced, *args[1:])

        return lm.site_module(self.name, layer).register_forward_pre_hook(hook).remove


class AttentionSite(Site):
    name = "attention_probabilities"
    unit_axes = "synapses (head, query position, key position)"
    one_position = False  # scaling layer l's attention changes every position from layer l up

    def active(self, lm: LoadedModel) -> contextlib.AbstractContextManager[None]:
        return attention_probe(lm)

    def _attach(
        self, lm: LoadedModel, layer: int, fn: SiteFn, positions: torch.Tensor | None
    ) -> Callable[[], None]:
        if positions is not None:
            raise QlocError("the attention site takes no positions: a synapse names its query position")
        module = lm.site_module(self.name, layer)
        if hasattr(module, _FN_ATTRIBUTE):
            raise QlocError(f"layer {layer}'s attention already has a probability hook")
        setattr(module, _FN_ATTRIBUTE, fn)
        return lambda: delattr(module, _FN_ATTRIBUTE)


NEURONS = NeuronSite()
ATTENTION = AttentionSite()


def probed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
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
                f"{lm.name!r} ({config.model_type}): the attention of layers {unreached} did not go "
                "through transformers' attention interface, so qloc cannot reach its probabilities"
            )
    finally:
        config._attn_implementation_internal = previous
        for module in modules:
            delattr(module, _CALLS_ATTRIBUTE)
