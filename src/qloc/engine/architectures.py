"""Where each model family keeps its intervention sites: knowledge neurons, value vectors and
attention probabilities.

Architectures are data: one :class:`ArchitectureSpec` per family, looked up by the Hugging Face
``config.model_type``. Everything that hooks or edits a model goes through this table, so adding
a family is one entry here (and one tiny-config test).

A *neuron* is a coordinate of the input of the MLP output projection (METHODS.md section 2):
after the activation function for GPT-2 style MLPs, ``act(gate(x)) * up(x)`` for gated MLPs.
Its *value vector* is the matching column of the output projection (a row of GPT-2's Conv1D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UnsupportedArchitectureError

SiteName = Literal["neuron_activation", "value_vectors", "attention_probabilities"]
"""The sites every family has in each decoder layer. ``neuron_activation``: the input of the MLP
output projection, [batch, seq, d_ff]; ``value_vectors``: that projection's weight, one vector of
d_model per neuron; ``attention_probabilities``: the post-softmax attention of the attention module,
[batch, heads, query, key]. :mod:`qloc.engine.sites` records and changes the two activation sites."""


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str
    """Dotted path from the ``*ForCausalLM`` model to the ``ModuleList`` of decoder layers."""
    mlp_out_proj: str
    """Dotted path inside a decoder layer to the MLP output projection: the neuron-activation site
    is its input, the value-vector site its weight."""
    value_vector_axis: Literal["column", "row"]
    """``column``: nn.Linear weight [d_model, d_ff]; ``row``: GPT-2 Conv1D weight [d_ff, d_model]."""
    attention: str
    """Dotted path inside a decoder layer to the attention module, the attention-probability site
    (probabilities are computed by transformers' attention interface inside it)."""
    final_norm: str
    """Dotted path from the model to the norm between the last decoder layer and the output head."""
    mlp_output_normalized: bool = False
    """True where the MLP output is normalised before the residual add (Gemma 2/3
    post-feedforward norm): F is then flat in a uniform scaling of the activation, so plain IG
    with a zero baseline sums to about 0."""

    def site_path(self, site: SiteName) -> str:
        """Dotted path inside a decoder layer to the module that holds ``site``: the MLP output
        projection (its input: the neurons; its weight: their value vectors) or the attention."""
        return self.attention if site == "attention_probabilities" else self.mlp_out_proj


def llama_layout(
    family: str, model_types: tuple[str, ...], mlp_output_normalized: bool = False
) -> ArchitectureSpec:
    """The module layout transformers gives Llama and the families derived from it."""
    return ArchitectureSpec(
        family, model_types, "model.layers", "mlp.down_proj", "column", "self_attn", "model.norm",
        mlp_output_normalized,
    )  # fmt: skip


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    # family, model types, decoder layers, MLP output projection, value-vector axis, attention, final norm
    ArchitectureSpec("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", "row", "attn", "transformer.ln_f"),
    ArchitectureSpec(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        "column",
        "attention",
        "gpt_neox.final_layer_norm",
    ),  # fmt: skip
    llama_layout("llama", ("llama", "mistral", "qwen2")),
    llama_layout("gemma", ("gemma",)),
    llama_layout("gemma_postnorm", ("gemma2", "gemma3_text"), mlp_output_normalized=True),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def architecture_for(model_type: str) -> ArchitectureSpec:
    """The table entry for a Hugging Face ``model_type``, or a clear error naming it."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model family {model_type!r} is not supported: qloc knows {', '.join(supported_model_types())}. "
            "Add an ArchitectureSpec entry for it to qloc.engine.architectures.ARCHITECTURES "
            "(where the MLP output projection, the decoder layers and the attention live)."
        ) from None
