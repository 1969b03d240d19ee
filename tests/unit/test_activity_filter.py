"""The activity filter: neurons that write much into the residual stream on every token are kept out
of edits (METHODS.md section 5)."""

import pytest
import torch

import qloc
from qloc.engine.editing import most_active, neuron_footprints, value_norms
from qloc.engine.sites import NEURONS
from qloc.studies.edit_measures import (
    EditConfig,
    activity_excluded,
    activity_footprints,
    edit_set,
    filtered_kn_sets,
)
from qloc.studies.knsets import FactKNSets, SharedNeuronFilter
from tests.helpers import make_tiny_model

PASSAGES = ["Paris is the capital of France", "The official language of Italy is Italian language"]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_footprint_is_the_value_norm_times_the_mean_absolute_activation(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    summed = torch.zeros(lm.num_layers, lm.d_ff)
    tokens = 0
    for text in PASSAGES:
        ids = torch.tensor([word_tokenizer(text).input_ids])
        with torch.no_grad(), NEURONS.record(lm) as acts:
            lm.model(input_ids=ids)
        for layer in range(lm.num_layers):
            summed[layer] += acts[layer][0].abs().sum(0)
        tokens += ids.shape[1]
    norms = torch.stack(list(value_norms(lm).values()))
    assert torch.allclose(neuron_footprints(lm, PASSAGES), summed / tokens * norms, rtol=1e-5, atol=1e-7)


def test_most_active_takes_the_largest_share_rounded_up():
    footprints = torch.tensor([[0.1, 5.0, 0.2], [9.0, 0.3, 0.4]])
    assert most_active(footprints, 0.2) == {(1, 0), (0, 1)}  # 0.2 x 6 = 1.2 -> 2 neurons
    assert most_active(footprints, 0.1) == {(1, 0)}
    assert most_active(footprints, 1e-9) == {(1, 0)}


def test_an_always_active_neuron_is_excluded_from_kn_sets_and_from_the_control(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    loud = (1, 5)
    with torch.no_grad():
        lm.value_vectors(loud[0])[loud[1]] *= 1000.0  # writes 1000 times as much on every token
    config = EditConfig(activity_filter=0.01)
    excluded = activity_excluded(config, activity_footprints(lm, config, ppl_passages=[]))
    assert loud in excluded and len(excluded) == 2  # 1 % of 2 x 128 neurons, rounded up
    assert (
        activity_excluded(EditConfig(), activity_footprints(lm, config, [])) == frozenset()
    )  # off by default

    known = {"P1/0": FactKNSets([[loud, (0, 1)], [loud, (0, 2)]], [loud], "P1")}
    filtered = filtered_kn_sets(known, SharedNeuronFilter(None, known), excluded)
    assert filtered["P1/0"].kn_set("self") == [(0, 1)]
    shape = (lm.num_layers, lm.d_ff)
    for seed in range(20):  # the control draws outside the excluded neurons
        control = edit_set(known["P1/0"], filtered["P1/0"], "random", shape, f"s{seed}", excluded)
        assert not set(control) & excluded


def test_activity_filter_is_a_share_and_off_leaves_the_stored_parameters_as_before():
    assert "activity_filter" not in EditConfig().params()  # runs stored before the filter resume
    assert EditConfig(activity_filter=0.0025).params()["activity_filter"] == 0.0025
    with pytest.raises(qloc.QlocError, match="activity_filter"):
        EditConfig(activity_filter=1.5)


def test_the_command_line_takes_a_share_or_off_and_names_the_flag_of_a_bad_value():
    from qloc.cli import WORD_PARSERS

    assert WORD_PARSERS["activity_filter"]("off") is None
    assert WORD_PARSERS["activity_filter"]("0.0025") == 0.0025
    with pytest.raises(qloc.QlocError, match="--activity-filter 'most'"):
        WORD_PARSERS["activity_filter"]("most")
    with pytest.raises(qloc.QlocError, match="--shared-filter 'x'"):
        WORD_PARSERS["shared_filter"]("x")


def test_the_output_says_whether_the_activity_filter_acted():
    from qloc.studies.edit_measures import activity_report

    assert activity_report(EditConfig()) == "activity filter off"
    assert activity_report(EditConfig(activity_filter=0.01)).startswith(
        "activity filter 0.01: the 1.00% of the model's neurons with the largest footprint"
    )
