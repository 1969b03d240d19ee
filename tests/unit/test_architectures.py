"""The architecture table on tiny random configs of every family: hook location, value-vector
orientation, and hooks that leave no trace."""

import pytest
import torch
import transformers

import qloc
from qloc import record_activations, scale_neurons
from tests.helpers import FAMILY_MODEL_TYPES, make_tiny_model, unsupported_family_config

INPUT = torch.tensor([[5, 17, 42, 7, 99, 3, 250]])


def logits(lm, ids=INPUT):
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.fixture(params=FAMILY_MODEL_TYPES)
def tiny(request):
    return make_tiny_model(request.param)


def test_every_family_has_a_tiny_test():
    covered = set(FAMILY_MODEL_TYPES)
    assert all(
        spec.model_types[0] in covered or set(spec.model_types) & covered for spec in qloc.ARCHITECTURES
    )
    assert {mt for spec in qloc.ARCHITECTURES for mt in spec.model_types} <= covered


def test_zero_activation_equals_zero_value_vectors(tiny):
    """Scaling the hooked activation of one layer by 0 is the same as zeroing that layer's value
    vectors, so the hook sits on the input of the output projection."""
    layer = 1
    neurons = [(layer, i) for i in range(tiny.d_ff)]
    with scale_neurons(tiny, neurons, 0.0):
        hooked = logits(tiny)
    with torch.no_grad():
        saved = tiny.value_vectors(layer).clone()
        tiny.value_vectors(layer).zero_()
    edited = logits(tiny)
    with torch.no_grad():
        tiny.value_vectors(layer).copy_(saved)
    torch.testing.assert_close(hooked, edited, rtol=0, atol=1e-5)
    assert not torch.allclose(hooked, logits(tiny), atol=1e-4)


def test_value_vectors_are_rows_of_the_activation_product(tiny):
    """MLP output = sum_i a_i * v_i (+ bias): the value-vector view has the right orientation."""
    layer = 2
    outputs = {}
    handle = tiny.mlp_out_proj(layer).register_forward_hook(
        lambda m, a, o: outputs.setdefault("out", o.detach())
    )
    with record_activations(tiny, [layer]) as acts:
        logits(tiny)
    handle.remove()
    bias = getattr(tiny.mlp_out_proj(layer), "bias", None)
    expected = acts[layer] @ tiny.value_vectors(layer).detach()
    if bias is not None:
        expected = expected + bias.detach()
    assert tiny.value_vectors(layer).shape == (tiny.d_ff, tiny.config.hidden_size)
    torch.testing.assert_close(outputs["out"], expected, rtol=1e-5, atol=1e-5)


def test_single_neuron_at_target_position_only(tiny):
    """A neuron intervention at one position leaves earlier positions' logits untouched."""
    before = logits(tiny)
    with scale_neurons(tiny, [(0, 3), (2, 5)], 0.0, positions=torch.tensor([4])):
        after = logits(tiny)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=0)
    assert not torch.equal(after[:, 4:], before[:, 4:])


def test_hooks_are_removed_also_on_exceptions(tiny):
    before = logits(tiny)
    with pytest.raises(RuntimeError):
        with scale_neurons(tiny, [(0, 1), (1, 2)], 0.0):
            raise RuntimeError("boom")
    with record_activations(tiny):
        logits(tiny)
    assert torch.equal(logits(tiny), before)
    assert all(not tiny.mlp_out_proj(layer)._forward_pre_hooks for layer in range(tiny.num_layers))


def test_post_feedforward_norm_is_flagged():
    flagged = {mt for spec in qloc.ARCHITECTURES if spec.mlp_output_normalized for mt in spec.model_types}
    assert flagged == {"gemma2", "gemma3_text"}
    for model_type in FAMILY_MODEL_TYPES:
        module_names = {n.split(".")[-1] for n, _ in make_tiny_model(model_type).model.named_modules()}
        assert ("post_feedforward_layernorm" in module_names) == (model_type in flagged), model_type


def test_unsupported_family_names_family_and_table():
    config = unsupported_family_config()
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(qloc.UnsupportedArchitectureError, match=r"'opt'.*ARCHITECTURES"):
        qloc.wrap_model(model)


def test_output_head_from_the_table_reproduces_the_logits(tiny):
    """final norm + unembedding (+ soft-capping) applied to the last decoder layer's output gives
    the model's own logits: the attribution engine relies on it."""
    captured = {}
    handle = tiny.layers[-1].register_forward_hook(
        lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    stock = logits(tiny)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits_from_final_hidden(captured["h"]), stock, rtol=0, atol=1e-6)
