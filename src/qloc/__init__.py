"""qloc: knowledge localization in language models.

Model + facts -> attributions -> KN sets -> analyses -> store -> tables/figures.
"""

from .data.pararel import Fact, ParaRel, load_pararel, sample_facts
from .engine.architectures import ARCHITECTURES, ArchitectureSpec, architecture_for
from .engine.attention import attention_hooks, attention_probe, record_attention, scale_attention
from .engine.attribution import (
    AMIG,
    SIG,
    Attribution,
    IntegratedGradients,
    attribute,
    attribute_many,
    kn_set,
    top_k,
)
from .engine.cloze import ClozeScore, score_cloze
from .engine.interventions import activation_hooks, record_activations, scale_neurons
from .engine.models import BUILTIN_MODELS, LoadedModel, load_model, wrap_model
from .errors import ContextLengthError, DataError, QlocError, RunDirectoryError, UnsupportedArchitectureError
from .report import write_report
from .runs.store import RunStore
from .studies.synapses import AttentionAttribution, attribute_attention, knowledge_synapses

__all__ = [
    "AMIG",
    "SIG",
    "Attribution",
    "IntegratedGradients",
    "attribute",
    "attribute_many",
    "kn_set",
    "top_k",
    "ARCHITECTURES",
    "ArchitectureSpec",
    "architecture_for",
    "ClozeScore",
    "score_cloze",
    "ContextLengthError",
    "DataError",
    "QlocError",
    "RunDirectoryError",
    "UnsupportedArchitectureError",
    "activation_hooks",
    "record_activations",
    "scale_neurons",
    "BUILTIN_MODELS",
    "LoadedModel",
    "load_model",
    "wrap_model",
    "Fact",
    "ParaRel",
    "load_pararel",
    "sample_facts",
    "RunStore",
    "attention_hooks",
    "attention_probe",
    "record_attention",
    "scale_attention",
    "AttentionAttribution",
    "attribute_attention",
    "knowledge_synapses",
    "write_report",
]
