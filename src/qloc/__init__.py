"""qloc: knowledge localization in language models.

Model + facts -> attributions -> KN sets -> analyses -> store -> tables/figures. The packages are
the map: ``engine`` (one model: sites, paths, attribution, edits), ``studies`` (the paper's
experiments, in a registry), ``runs`` (the run store and the sweep), ``data`` (ParaRel, WikiText)
and ``report`` (the HTML report); ``cli`` is the ``qloc`` command on top.
"""

from .data.pararel import Fact, ParaRel, load_pararel, sample_facts
from .engine.architectures import ARCHITECTURES, ArchitectureSpec, architecture_for
from .engine.attribution import (
    AMIG,
    SIG,
    AMIGGradientXActivation,
    AttentionAttribution,
    Attribution,
    AttributionSettings,
    GradientXActivation,
    IntegratedGradients,
    attribute,
    attribute_attention,
    attribute_many,
    kn_set,
    knowledge_synapses,
    top_k,
)
from .engine.cloze import ClozeScore, score_cloze
from .engine.gguf import BUILTIN_MODELS
from .engine.models import LoadedModel, load_model, wrap_model
from .engine.sites import ATTENTION, NEURONS, Site, attention_probe
from .errors import (
    ConfigError,
    ContextLengthError,
    DataError,
    QlocError,
    RunDirectoryError,
    UnsupportedArchitectureError,
)
from .report import write_report
from .runs.store import RunStore

# The one intervention API at each of its two sites, under the names users know.
activation_hooks, record_activations, scale_neurons = NEURONS.replace, NEURONS.record, NEURONS.scale
attention_hooks, record_attention, scale_attention = ATTENTION.replace, ATTENTION.record, ATTENTION.scale

__all__ = [
    "AMIG",
    "SIG",
    "Attribution",
    "AttributionSettings",
    "IntegratedGradients",
    "GradientXActivation",
    "AMIGGradientXActivation",
    "attribute",
    "attribute_many",
    "kn_set",
    "top_k",
    "ARCHITECTURES",
    "ArchitectureSpec",
    "architecture_for",
    "ClozeScore",
    "score_cloze",
    "ConfigError",
    "ContextLengthError",
    "DataError",
    "QlocError",
    "RunDirectoryError",
    "UnsupportedArchitectureError",
    "Site",
    "NEURONS",
    "ATTENTION",
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
