"""The attribution engine against the plain per-layer reference of METHODS.md section 3."""

import warnings

import pytest
import torch

from qloc.engine.attribution import attribute, kn_set, top_k
from qloc.engine.paths import integration_points
from qloc.errors import QlocError
from qloc.testing import reference_scores, reference_token_scores
from tests.helpers import FAMILY_MODEL_TYPES, assert_equivalent, make_tiny_model

PROMPT, ANSWER = "Paris is the capital of", "France"


@pytest.fixture(scope="module", params=FAMILY_MODEL_TYPES)
def tiny(request, word_tokenizer):
    return make_tiny_model(request.param, word_tokenizer)


@pytest.mark.parametrize("method", ["ig", "amig", "sig"])
def test_engine_equals_reference_on_every_family(tiny, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Small chunks, so that passes start at several layers and one layer is split across passes.
        result = attribute(tiny, PROMPT, ANSWER, method, steps=7, max_batch_rows=10)
    assert result.scores.shape == (tiny.num_layers, tiny.d_ff) and result.scores.dtype == torch.float32
    assert_equivalent(result.scores, reference_scores(tiny, PROMPT, ANSWER, method, steps=7))


@pytest.mark.parametrize("rule", ["midpoint", "gauss"])
def test_rules_equal_reference(word_tokenizer, rule):
    lm = make_tiny_model("llama", word_tokenizer)
    result = attribute(lm, PROMPT, ANSWER, "amig", steps=5, rule=rule)
    assert_equivalent(result.scores, reference_scores(lm, PROMPT, ANSWER, "amig", steps=5, rule=rule))


def test_multi_token_answers_average_teacher_forced_tokens(word_tokenizer):
    lm = make_tiny_model("qwen2", word_tokenizer)
    answer = "Italian language"
    assert len(lm.tokenizer(" " + answer, add_special_tokens=False).input_ids) == 2
    every = attribute(lm, "The official language of Italy is", answer, "ig", steps=6, answer_tokens="all")
    first = attribute(lm, "The official language of Italy is", answer, "ig", steps=6)
    per_token = [
        reference_token_scores(lm, "The official language of Italy is", answer, "ig", t, steps=6)
        for t in range(2)
    ]
    assert_equivalent(every.scores, (per_token[0] + per_token[1]) / 2)
    assert_equivalent(first.scores, per_token[0])
    assert len(every.answer_tokens) == 2 and len(first.answer_tokens) == 1
    assert every.completeness_residual.shape == (2, lm.num_layers)


@pytest.mark.parametrize("rule", ["midpoint", "gauss"])
def test_completeness_converges(word_tokenizer, rule):
    """At 200 steps the midpoint and Gauss-Legendre sums of a layer are within 1 % of
    F(input) - F(baseline); a 5-step right Riemann sum is visibly further off."""
    lm = make_tiny_model("gpt2", word_tokenizer)
    layer = 1
    with torch.no_grad():  # a confident prediction and large activations: a curved path
        lm.model.get_output_embeddings().weight.mul_(30)
        lm.mlp_out_proj(layer).weight.mul_(40)
        top = int(lm.model(word_tokenizer(PROMPT, return_tensors="pt").input_ids).logits[0, -1].argmax())
    answer = word_tokenizer.decode([top])
    fine = attribute(lm, PROMPT, answer, "ig", steps=200, rule=rule)
    coarse = attribute(lm, PROMPT, answer, "ig", steps=5, rule="right")
    delta = float(fine.f_input[0] - fine.f_baseline[0, layer])
    assert abs(delta) > 0.1
    assert abs(float(fine.scores[layer].sum()) - delta) <= 0.01 * abs(delta)
    assert (
        float(coarse.completeness_residual[0, layer])
        > 0.02 * abs(delta)
        > float(fine.completeness_residual[0, layer])
    )


def test_integration_points():
    alphas, weights = integration_points(4, "right")
    assert alphas.tolist() == [0.25, 0.5, 0.75, 1.0] and weights.sum() == pytest.approx(1)
    alphas, _ = integration_points(4, "midpoint")
    assert alphas.tolist() == [0.125, 0.375, 0.625, 0.875]
    alphas, weights = integration_points(5, "gauss")
    assert float((weights * alphas**4).sum()) == pytest.approx(1 / 5, rel=1e-6)  # exact for polynomials
    with pytest.raises(QlocError, match="simpson"):
        integration_points(4, "simpson")


def test_kn_set_thresholds_and_top_k():
    scores = torch.zeros(3, 4)
    scores[0, 1], scores[2, 3], scores[1, 0], scores[1, 2] = 1.0, 0.2, 0.19, -5.0
    assert kn_set(scores) == [(0, 1), (2, 3)]
    assert kn_set(scores, threshold=0.1) == [(0, 1), (1, 0), (2, 3)]
    assert kn_set(scores, top_k_neurons=3) == [(0, 1), (2, 3), (1, 0)]
    assert top_k(scores, 1) == [(0, 1)]
    assert kn_set(-scores.abs()) == []  # no positive score: nothing to localize


def test_model_is_left_exactly_as_before(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    lm.model.lm_head.weight.requires_grad_(True)
    ids = torch.tensor([[5, 8, 13, 21]])
    with torch.no_grad():
        before = lm.model(ids).logits
    for method in ("ig", "amig", "sig"):
        attribute(lm, PROMPT, ANSWER, method, steps=3)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)
    assert all(not lm.mlp_out_proj(layer)._forward_pre_hooks for layer in range(lm.num_layers))
    assert all(not layer._forward_pre_hooks for layer in lm.layers)
    assert lm.model.lm_head.weight.requires_grad and not any(
        p.grad is not None for p in lm.model.parameters()
    )


def test_post_norm_models_warn_for_ig(word_tokenizer):
    lm = make_tiny_model("gemma3_text", word_tokenizer)
    with pytest.warns(UserWarning, match="AMIG and SIG"):
        attribute(lm, PROMPT, ANSWER, "ig", steps=3)


def test_bad_method_is_named(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    with pytest.raises(QlocError, match="'lrp'"):
        attribute(lm, PROMPT, ANSWER, "lrp")


def test_half_precision_models_attribute_in_fp32(word_tokenizer):
    """bf16 weights: the path points, softmax and scores stay fp32; the result tracks fp32's."""
    lm32 = make_tiny_model("llama", word_tokenizer)
    lm16 = make_tiny_model("llama", word_tokenizer)
    lm16.model.to(torch.bfloat16)
    reference = attribute(lm32, PROMPT, ANSWER, "amig", steps=5)
    half = attribute(lm16, PROMPT, ANSWER, "amig", steps=5)
    assert half.scores.dtype == torch.float32 and torch.isfinite(half.scores).all()
    correlation = torch.corrcoef(torch.stack([half.scores.flatten(), reference.scores.flatten()]))[0, 1]
    assert correlation > 0.9


def test_sig_combination_never_flips_a_sign():
    """The synthetic case: per-word attributions [1, 0, 0] and [0, -4, 2]. The literal rescale to the
    raw total (-1) over the normalised total (+0.553) gave [-1.81, 1.62, -0.81]; the combination
    keeps each neuron's sign of sum_j IG_j / ||IG_j||."""
    from qloc.engine.attribution import SIG

    per_word = torch.tensor([[1.0, 0.0, 0.0], [0.0, -4.0, 2.0]])[:, None, :]  # [words, L=1, d_ff=3]
    combined = SIG().combine(per_word)[0]
    unit = per_word[0, 0] / 1.0 + per_word[1, 0] / 20**0.5
    torch.testing.assert_close(combined, unit * (1 + 20**0.5) / 2)
    assert combined.tolist()[0] > 0 and combined.tolist()[1] < 0 < combined.tolist()[2]
    # The literal rescale's KN set was {(0, 1)}: the neuron whose only contribution is negative.
    assert kn_set(combined[None]) == [(0, 0), (0, 2)]
    # A word whose attribution is all zero is left out rather than dividing by zero.
    with_silent = torch.cat([per_word, torch.zeros(1, 1, 3)])
    torch.testing.assert_close(SIG().combine(with_silent), SIG().combine(per_word))
    assert torch.equal(SIG().combine(torch.zeros(2, 1, 3)), torch.zeros(1, 3))


def test_random_sig_combinations_keep_signs():
    generator = torch.Generator().manual_seed(0)
    from qloc.engine.attribution import SIG

    for _ in range(50):
        per_word = torch.randn(4, 2, 5, generator=generator) * torch.rand(4, 1, 1, generator=generator) * 10
        combined = SIG().combine(per_word)
        unit = (per_word / per_word.flatten(1).norm(dim=1)[:, None, None]).sum(0)
        assert torch.equal(torch.sign(combined), torch.sign(unit))
