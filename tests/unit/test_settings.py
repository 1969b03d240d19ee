"""Attribution settings: one default each, checked once, offered under the flags they always had,
stored flat as runs made before they were grouped stored them; and the sweeps' work builders, which
Ray pickles."""

import dataclasses
import pickle

import pytest

from qloc.cli import FLAGS
from qloc.commands import Attribute
from qloc.data.selection import Selection
from qloc.engine.attribution import (
    DEFAULT_KN_THRESHOLD,
    DEFAULT_STEPS,
    AttributionSettings,
    PathSettings,
    path_settings,
)
from qloc.errors import ConfigError, RunDirectoryError
from qloc.runs.store import RunStore
from qloc.studies.census import CensusWorkBuilder
from qloc.studies.cloze import ClozeWorkBuilder
from qloc.studies.edit_measures import EditConfig, SequentialWorkBuilder
from qloc.studies.editing import EditWorkBuilder
from qloc.studies.knsets import FactKNSets, SharedNeuronFilter
from qloc.studies.localize import LocalizeConfig, LocalizeRequest, LocalizeWorkBuilder
from qloc.studies.localize_run import KN_CUT
from qloc.studies.mapping import MappingConfig, MappingWorkBuilder
from qloc.studies.registry import build_request, option_specs
from qloc.studies.synapses import SynapseConfig, SynapseRequest, SynapseWorkBuilder

OLD_LOCALIZE_PARAMS = {
    "answer_tokens": "first",
    "cas_beta1": 1.0,
    "cas_beta2": 1.0,
    "cas_threshold": 0.3,
    "data": "bundled",
    "dtype": "float32",
    "facts_per_relation": 3,
    "limit": None,
    "methods": ["ig"],
    "model": "smollm2-135m",
    "query_filter": "mask_final",
    "relations": "P19,P27,P36,P103",
    "rule": "right",
    "save_scores": False,
    "seed": 0,
    "steps": 20,
    "threshold": 0.2,
    "top_k": None,
    "top_scores": 20,
}
"""A localize stage's parameters as a run made before the settings were grouped stored them."""
OLD_SYNAPSE_CONFIG = {
    "answer_tokens": "first",
    "enhance": 2.0,
    "method": "ig",
    "rule": "right",
    "seed": 0,
    "static_threshold": 0.1,
    "steps": 20,
    "suppress": 0.0,
    "threshold": 0.3,
}
"""The synapse config's part of a synapse stage's stored parameters, from such a run."""


def test_each_setting_has_one_default():
    settings = AttributionSettings()
    assert (settings.steps, settings.rule, settings.answer_tokens) == (DEFAULT_STEPS, "right", "first")
    assert (settings.threshold, settings.top_k) == (DEFAULT_KN_THRESHOLD, None)
    assert PathSettings().params() == {"steps": DEFAULT_STEPS, "rule": "right", "answer_tokens": "first"}
    # Every config that takes them nests them, with those defaults.
    assert LocalizeConfig().attribution == settings
    assert Attribute(prompt="p", answer="a").attribution == settings
    assert SynapseConfig().path == PathSettings()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"steps": 0}, "steps 0: must be at least 1"),
        ({"rule": "simpson"}, "rule 'simpson': choose right, midpoint, gauss"),
        ({"answer_tokens": "some"}, "answer_tokens 'some': choose all or first"),
        ({"threshold": 0.0}, "threshold 0.0: must be in (0, 1]"),
        ({"threshold": 1.5}, "threshold 1.5: must be in (0, 1]"),
        ({"top_k": 0}, "top_k 0: must be at least 1"),
    ],
)
def test_bad_settings_are_refused_when_made_naming_the_setting(given, message):
    with pytest.raises(ConfigError) as refused:
        AttributionSettings(**given)
    assert str(refused.value) == message
    assert refused.value.describe(FLAGS.__getitem__).startswith("--" + next(iter(given)).replace("_", "-"))
    if "threshold" not in given and "top_k" not in given:
        with pytest.raises(ConfigError, match=message.split(":")[0]):
            PathSettings(**given)


def test_keyword_arguments_take_the_place_of_the_settings_and_are_checked():
    assert path_settings() == PathSettings()
    chosen = AttributionSettings(steps=5, top_k=3)
    assert path_settings(chosen, rule="gauss") == AttributionSettings(steps=5, rule="gauss", top_k=3)
    assert path_settings(chosen) is chosen
    with pytest.raises(ConfigError, match="steps -1"):
        path_settings(chosen, steps=-1)


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("localize", ("--steps", "--rule", "--answer-tokens", "--threshold", "--top-k")),
        ("attribute", ("--steps", "--rule", "--answer-tokens", "--threshold", "--top-k")),
        ("synapses", ("--steps", "--rule", "--answer-tokens", "--threshold")),
    ],
)
def test_the_command_line_offers_the_settings_under_their_flags(command, flags):
    from qloc.cli import COMMANDS

    (entry,) = [entry for entry in COMMANDS if entry.name == command]
    offered = [spec.flag for spec in option_specs(entry.request)]
    assert [flag for flag in offered if flag in flags] == list(flags)


def test_flat_values_build_the_nested_settings():
    localize = build_request(LocalizeRequest, {"run_dir": "r", "steps": 3, "top_k": 5, "rule": "midpoint"})
    assert localize.config.attribution == AttributionSettings(steps=3, rule="midpoint", top_k=5)
    synapses = build_request(SynapseRequest, {"run_dir": "r", "steps": 4, "threshold": 0.5})
    assert synapses.config.path == PathSettings(steps=4) and synapses.config.threshold == 0.5


def _localize_params(config: LocalizeConfig) -> dict:
    """What ``qloc localize`` stores for the run of :data:`OLD_LOCALIZE_PARAMS` with ``config``."""
    selection = Selection(relations="P19,P27,P36,P103", facts_per_relation=3)
    return {"model": "smollm2-135m", "dtype": "float32", **selection.params(), **config.params()}


def test_stored_parameters_keep_the_layout_of_older_runs():
    assert _localize_params(LocalizeConfig(methods=("ig",))) == OLD_LOCALIZE_PARAMS
    assert SynapseConfig().params() == OLD_SYNAPSE_CONFIG
    assert AttributionSettings.from_params(OLD_LOCALIZE_PARAMS) == AttributionSettings()
    assert PathSettings.from_params(OLD_SYNAPSE_CONFIG) == PathSettings()
    steps5 = _localize_params(LocalizeConfig(methods=("ig",), attribution=AttributionSettings(steps=5)))
    assert [k for k in KN_CUT if steps5.get(k) != OLD_LOCALIZE_PARAMS.get(k)] == ["steps"]


def test_an_older_run_resumes_and_other_settings_are_refused(tmp_path):
    RunStore.open_stage(tmp_path, "localize", OLD_LOCALIZE_PARAMS, env={"python": "3"}).close()
    RunStore.check_stage(tmp_path, "localize", _localize_params(LocalizeConfig(methods=("ig",))))
    other = LocalizeConfig(methods=("ig",), attribution=AttributionSettings(threshold=0.3))
    with pytest.raises(RunDirectoryError, match="threshold: stored 0.2, given 0.3"):
        RunStore.check_stage(tmp_path, "localize", _localize_params(other))


def test_bad_settings_on_the_command_line_name_their_flags(tmp_path, qloc_cli):
    run = tmp_path / "run"
    refused = qloc_cli("localize", "--run-dir", run, "--threshold", "0")
    assert refused.code == 2 and "--threshold 0.0: must be in (0, 1]" in refused.err
    refused = qloc_cli("attribute", "--prompt", "p", "--answer", "a", "--top-k", "0", "--model", tmp_path)
    assert refused.code == 2 and "--top-k 0: must be at least 1" in refused.err
    refused = qloc_cli("synapses", "--run-dir", run, "--steps", "0")
    assert refused.code == 2 and "--steps 0: must be at least 1" in refused.err
    assert not run.exists()


def _builders() -> list:
    knowledge = {"P1/0": FactKNSets([[(0, 1)], [(0, 1), (1, 2)]], [(0, 1)])}
    shared = SharedNeuronFilter(0.1, knowledge)
    return [
        LocalizeWorkBuilder(LocalizeConfig(attribution=AttributionSettings(steps=3)), 64),
        ClozeWorkBuilder(8),
        CensusWorkBuilder("bfloat16", 16, [("The capital of France is", "Paris")]),
        MappingWorkBuilder(MappingConfig(), knowledge, shared, {"P1/0": "KC"}),
        SynapseWorkBuilder(SynapseConfig(path=PathSettings(steps=2)), knowledge, 32),
        EditWorkBuilder(EditConfig(), knowledge, shared, [], ["a passage"]),
        SequentialWorkBuilder(EditConfig(mode="update"), knowledge, shared, [], [], 3, ["a passage"]),
    ]


@pytest.mark.parametrize("builder", _builders(), ids=lambda builder: type(builder).__name__)
def test_work_builders_pickle_for_ray_with_what_they_are_given(builder):
    copy = pickle.loads(pickle.dumps(builder))
    assert type(copy) is type(builder) and copy == builder
    assert dataclasses.is_dataclass(builder) and callable(builder)
    with pytest.raises(dataclasses.FrozenInstanceError):
        builder.__setattr__(dataclasses.fields(builder)[0].name, None)
