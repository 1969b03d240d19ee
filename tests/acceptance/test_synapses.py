"""Knowledge synapses: the attention-probability intervention point on every family, attention
attribution against a direct per-layer reference, KS selection, the tables, and the CLI."""

import torch

from qloc import attention_probe, scale_attention
from qloc.engine.attribution import attribute_attention
from qloc.engine.tokens import encode_query


def test_suppressing_smollm2_synapses_lowers_the_answer(smollm2):
    result = attribute_attention(smollm2, "The Eiffel Tower is located in the city of", "Paris", steps=5)
    synapses = [s for s, _ in result.synapses()]
    assert synapses and float(result.f_input[0]) > 0.5
    ids = torch.tensor(
        [list(encode_query(smollm2, "The Eiffel Tower is located in the city of", "Paris").input_ids)]
    )
    token = encode_query(smollm2, "x", "Paris").answer_ids[0]
    with torch.no_grad():
        with attention_probe(smollm2):
            before = torch.softmax(smollm2.model(input_ids=ids).logits[0, -1], -1)[token]
        with scale_attention(smollm2, synapses, 0.0):
            after = torch.softmax(smollm2.model(input_ids=ids).logits[0, -1], -1)[token]
    torch.testing.assert_close(before, result.f_input[0], rtol=1e-4, atol=1e-6)
    assert after < 0.5 * before
