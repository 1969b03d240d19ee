"""qloc: knowledge localization in language models.

Model + facts -> attributions -> KN sets -> analyses -> store -> tables/figures.
"""

from .architectures import ARCHITECTURES, ArchitectureSpec, architecture_for
from .attention import attention_hooks, attention_probe, record_attention, scale_attention
from .attribution import AMIG, SIG, Attribution, IntegratedGradients, attribute, attribute_many, kn_set, top_k
from .cloze import ClozeScore, score_cloze
from .errors import ContextLengthError, DataError, QlocError, RunDirectoryError, UnsupportedArchitectureError
from .interventions import activation_hooks, record_activations, scale_neurons
from .models import BUILTIN_MODELS, LoadedModel, load_model, wrap_model
from .pararel import Fact, ParaRel, load_pararel, sample_facts
from .report import write_report
from .store import RunStore
from .synapses import AttentionAttribution, attribute_attention, knowledge_synapses

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
