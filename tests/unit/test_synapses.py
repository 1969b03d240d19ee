"""Knowledge synapses: the attention-probability intervention point on every family, attention
attribution against a direct per-layer reference, KS selection, the tables, and the CLI."""

import pandas as pd
import pytest
import torch
import transformers

import qloc
from qloc import attention_hooks, record_attention, scale_attention
from qloc.engine.attribution import PathSettings, attribute_attention, knowledge_synapses
from qloc.engine.paths import AnswerProbability, frozen_parameters, integration_points
from qloc.engine.tokens import encode_query
from qloc.errors import QlocError
from qloc.studies.synapse_tables import cost_table, effects_table
from tests.helpers import FAMILY_MODEL_TYPES, make_tiny_model, tiny_config

PROMPT, ANSWER = "The capital of France is", "Paris"


def _ids(lm, length=20):
    return torch.randint(4, lm.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def _reference_attention_ig(lm, prompt, answer, steps):
    """Per layer and step, a full forward with that layer's probabilities replaced by a leaf."""
    query = encode_query(lm, prompt, answer)
    target, token = query.target_positions[0], query.answer_ids[0]
    ids = torch.tensor([list(query.input_ids[: target + 1])])
    alphas, weights = integration_points(steps)
    with torch.no_grad(), record_attention(lm) as clean:
        lm.model(input_ids=ids)
    scores = []
    with frozen_parameters(lm):
        for layer in range(lm.num_layers):
            total = torch.zeros_like(clean[layer][0])
            for alpha, weight in zip(alphas, weights):
                point = (alpha * clean[layer]).requires_grad_(True)
                with attention_hooks(lm, {layer: lambda p, point=point: point}):
                    logits = lm.model(input_ids=ids).logits[:, -1]
                (grad,) = torch.autograd.grad(AnswerProbability.apply(logits, token).sum(), point)
                total += weight * grad[0]
            scores.append(clean[layer][0] * total)
    return torch.stack(scores)


def _effects():
    rows = []
    for query, kind in ((0, "KC"), (1, "KI")):
        for operation, dkn, dprob in (
            ("none", 0.0, 0.0),
            ("suppress", -0.5 - query, -0.4),
            ("enhance", 0.2, 0.1),
        ):
            rows.append(
                {
                    "fact_id": "f",
                    "method": "ig",
                    "class": kind,
                    "query_index": query,
                    "operation": operation,
                    "n_synapses": 4,
                    "dkn_kn": dkn,
                    "dkn_neighbour": dkn / 10,
                    "dkn_random": 0.0,
                    "dprob": dprob,
                    "seconds": 0.1 * (1 + query),
                    "peak_mb": 2.0 + query,
                    "memory_measure": "cpu rss",
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_scaling_every_probability_by_one_leaves_logits_identical(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    ids = _ids(lm)  # 20 tokens: past the tiny Gemmas' 16-token sliding window
    every = [
        (layer, h, i, j)
        for layer in range(lm.num_layers)
        for h in range(lm.config.num_attention_heads)
        for i in range(20)
        for j in range(20)
    ]
    with torch.no_grad():
        stock = lm.model(input_ids=ids).logits
        with scale_attention(lm, every, 1.0):
            scaled = lm.model(input_ids=ids).logits
        with attention_hooks(lm, {0: lambda p: p * 1.0}):
            hooked = lm.model(input_ids=ids).logits
    assert torch.equal(stock, scaled) and torch.equal(stock, hooked)


def test_suppressing_one_entry_equals_hand_computed_masked_attention(word_tokenizer):
    lm = make_tiny_model("gpt2", word_tokenizer)
    ids = _ids(lm, 7)
    layer, head, i, j = 1, 2, 5, 3
    attn = lm.attention(layer)
    seen = {}
    attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    attn.register_forward_hook(lambda m, args, output: seen.update(out=output[0]))
    with torch.no_grad(), scale_attention(lm, [(layer, head, i, j)], 0.0):
        lm.model(input_ids=ids)
    x, out = seen["x"], seen["out"]
    # By hand: GPT-2's fused qkv projection, causal softmax, the one probability set to 0, no renormalisation.
    q, k, v = attn.c_attn(x).split(lm.config.n_embd, dim=2)
    heads = lm.config.n_head
    q, k, v = (t.view(2, 7, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(logits, -1)
    probs[:, head, i, j] = 0
    expected = attn.c_proj((probs @ v).transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        out[:, i], attn.c_proj((torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, 7, -1))[:, i]
    )


def test_interventions_restore_the_model_also_on_errors(word_tokenizer):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config("llama", len(word_tokenizer)), attn_implementation="sdpa"
    )
    lm = qloc.wrap_model(model, word_tokenizer)
    ids = _ids(lm, 9)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with record_attention(lm) as probs:
            probed = model(input_ids=ids).logits
        assert lm.config._attn_implementation == "sdpa"  # switched for the block only
        torch.testing.assert_close(probed, stock, rtol=1e-5, atol=1e-5)
        assert probs[0].shape == (2, 4, 9, 9)
        torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 4, 9))
        with pytest.raises(RuntimeError, match="boom"):
            with scale_attention(lm, [(0, 0, 3, 1)], 0.0):
                raise RuntimeError("boom")
    assert lm.config._attn_implementation == "sdpa"
    for layer in range(lm.num_layers):
        assert not [name for name in vars(lm.attention(layer)) if name.startswith("_qloc")]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, stock)


def test_synapse_positions_outside_the_input_are_named(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    with (
        pytest.raises(QlocError, match="outside"),
        torch.no_grad(),
        scale_attention(lm, [(0, 0, 30, 0)], 0.0),
    ):
        lm.model(input_ids=_ids(lm, 5))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_attention_attribution_equals_the_per_layer_reference(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    engine = attribute_attention(lm, PROMPT, ANSWER, steps=4, max_batch_rows=3)  # chunks split layers
    reference = _reference_attention_ig(lm, PROMPT, ANSWER, 4)
    assert engine.scores.shape == reference.shape
    assert float((engine.scores - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


@pytest.mark.parametrize("model_type", ["gpt_neox", "qwen2", "gemma2"])
def test_attention_attribution_is_complete_at_200_steps(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    result = attribute_attention(lm, PROMPT, ANSWER, steps=200, rule="midpoint")
    delta = result.f_input[:, None] - result.f_zero
    assert float(delta.abs().max()) > 0  # the test is not vacuous
    assert float(result.completeness_residual.max()) <= 0.01 * float(delta.abs().max())


def test_multi_token_answers_average_their_prefixes(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    both = attribute_attention(lm, "The capital of", "France is", steps=3, answer_tokens="all")
    first = attribute_attention(lm, "The capital of", "France is", steps=3, answer_tokens="first")
    assert both.scores.shape[-1] == first.scores.shape[-1] + 1 and len(both.answer_tokens) == 2
    assert both.f_input.shape == (2,) and first.f_input.shape == (1,)


def test_knowledge_synapses_threshold():
    scores = torch.zeros(2, 2, 3, 3)
    scores[1, 0, 2, 1], scores[0, 1, 1, 0], scores[0, 0, 2, 2] = 1.0, 0.3, 0.29
    assert [s for s, _ in knowledge_synapses(scores, 0.3)] == [(1, 0, 2, 1), (0, 1, 1, 0)]
    assert knowledge_synapses(-scores) == []


def test_effects_and_cost_tables_on_hand_made_rows():
    table = effects_table(_effects())
    suppress = table[table.operation == "suppress"].set_index("class")
    assert suppress.loc["KC", "dkn_kn_mean"] == -0.5 and suppress.loc["KI", "dkn_kn_mean"] == -1.5
    assert suppress.loc["Avg", "dkn_kn_mean"] == -1.0 and suppress.loc["Avg", "queries"] == 2
    assert list(table.operation.drop_duplicates()) == ["suppress", "enhance"]
    cost = cost_table(_effects())
    assert list(cost.operation) == ["none", "suppress", "enhance"]
    assert cost.seconds_mean.tolist() == pytest.approx([0.15] * 3) and cost.peak_mb_max.tolist() == [3.0] * 3


def test_multi_token_answers_manipulate_only_synapses_of_the_first_tokens_prefix(word_tokenizer):
    from qloc.data.pararel import Fact
    from qloc.runs.rows import UnitWriter
    from qloc.studies.knsets import FactKNSets
    from qloc.studies.synapses import SynapseConfig, SynapseWorkBuilder

    lm = make_tiny_model("llama", word_tokenizer)
    fact = Fact(
        "P1/0", "P1", "test", "France", "New York", ("The capital of France is", "France has its capital in")
    )
    knowledge = {fact.id: FactKNSets([[(0, 1), (1, 2)], [(1, 2), (2, 3)]], [])}
    writer = UnitWriter()
    config = SynapseConfig(path=PathSettings(steps=3, answer_tokens="all"), threshold=0.0001)
    SynapseWorkBuilder(config, knowledge)(lm)(fact, writer)
    found, effects = pd.DataFrame(writer.rows["synapses"]), pd.DataFrame(writer.rows["synapse_effects"])
    prompt_length = encode_query(lm, fact.queries[0], fact.object).target_positions[0] + 1
    stored = found.synapses[0]
    assert any(s[2] >= prompt_length for s in stored)  # KS at the teacher-forced answer position exist ...
    applied = effects[(effects.query_index == 0) & (effects.operation == "suppress")].n_synapses.item()
    assert applied == sum(s[2] < prompt_length for s in stored) < len(stored)  # ... and are not applied
    assert set(effects.operation) == {"none", "suppress", "enhance"} and effects.dkn_kn.notna().all()
