"""KN editing: restore is bit-exact, one neuron touches one value vector, updates move the answer."""

import pytest

import qloc
from qloc.engine.editing import edit_knowledge


@pytest.mark.real_model
def test_sign_aware_erasure_on_smollm2_lowers_a_known_answer(smollm2):
    """SmolLM2 ranks Paris first here (P = 0.70). Erasing through the query's own AMIG KN set with
    the signs of its activations lowers P(Paris); about half of the set has negative activations,
    and the literal equation through those alone raises it."""
    from qloc.engine.attribution import attribute
    from qloc.engine.editing import activation_signs, target_activations

    prompt, answer = "The Eiffel Tower is located in the city of", "Paris"
    before = qloc.score_cloze(smollm2, [prompt], [answer])[0]
    assert before.rank == 0
    with pytest.warns(
        UserWarning, match="too coarse"
    ):  # layer 29's residual at 10 steps; the set is what counts
        neurons = attribute(smollm2, prompt, answer, "amig", steps=10).kn_set()
    signs = activation_signs(target_activations(smollm2, [prompt], answer), neurons)
    negative = [u for u, sign in zip(neurons, signs) if sign < 0]
    assert len(negative) > 0.2 * len(neurons)
    with edit_knowledge(smollm2, neurons, answer, signs=signs):
        aware = qloc.score_cloze(smollm2, [prompt], [answer])[0].prob
    with edit_knowledge(smollm2, negative, answer):
        literal = qloc.score_cloze(smollm2, [prompt], [answer])[0].prob
    assert aware < 0.5 * before.prob and literal > before.prob
