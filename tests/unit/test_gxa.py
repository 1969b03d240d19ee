"""The first-order tier (METHODS.md section 3.1): gxa and gxa-amig are IG's and AMIG's one-step right
sums from one forward and one backward, with IG's completeness bookkeeping, KN-set rules and stored
rows."""

import json
import warnings

import pytest
import torch

import qloc
from qloc.data.selection import Selection
from qloc.engine.attribution import METHODS, AttributionSettings, attribute, attribute_many
from qloc.engine.paths import PathIntegrator, frozen_parameters
from qloc.engine.sites import NEURONS
from qloc.engine.tokens import encode_query
from qloc.runs.executors import Execution
from qloc.runs.store import RunStore
from qloc.studies import localize
from qloc.studies.stored_knsets import load_dense_scores
from qloc.testing import reference_scores
from tests.helpers import assert_equivalent, make_tiny_model

PROMPT, ANSWER = "Paris is the capital of", "France"
FIRST_ORDER = {"gxa": "ig", "gxa-amig": "amig"}
"""Each first-order method and the method whose baseline it takes."""


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3_text"])
def tiny(request, word_tokenizer):
    return make_tiny_model(request.param, word_tokenizer)


def quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(*args, **kwargs)


@pytest.mark.parametrize("method", list(FIRST_ORDER))
def test_first_order_equals_one_step_of_the_per_layer_reference(tiny, method):
    """The identity holds: the one-step right rule evaluates the gradient at alpha = 1, the input."""
    found = quietly(tiny, PROMPT, ANSWER, method)
    reference = reference_scores(tiny, PROMPT, ANSWER, FIRST_ORDER[method], steps=1, answer_tokens="first")
    assert found.scores.shape == (tiny.num_layers, tiny.d_ff) and found.scores.dtype == torch.float32
    assert_equivalent(found.scores, reference)
    assert (found.steps, found.rule, found.params["steps"]) == (1, "right", 1)


BATCHED_QUERIES = [
    ("Paris is the capital of", "France"),
    ("The official language of Italy is", "Italian language"),
    ("Rome is the capital of", "Italy"),
    ("Madrid is located in", "Spain"),
    ("Berlin is the capital of", "Germany"),
    ("The native language of Paris is", "French"),
    ("The capital of France is", "Paris"),
]
"""Four prompts of 5 tokens, two of 6 and one of 4 (the word tokenizer); the two-token answer's
second token is predicted after 7."""


@pytest.mark.parametrize("answer_tokens", ["first", "all"])
@pytest.mark.parametrize("method", list(FIRST_ORDER))
def test_batched_queries_get_their_one_query_results(tiny, method, answer_tokens):
    """attribute_many groups queries by prompt length (batches of 3 split the group of 4; a small
    row chunk splits the residual rows across queries) and gives each query what attribute gives it
    alone: scores to fp32 rounding, the same KN set, F and completeness residual."""
    prompts, answers = zip(*BATCHED_QUERIES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = attribute_many(
            tiny, prompts, answers, method, answer_tokens=answer_tokens, batch_size=3, max_batch_rows=4
        )
    for found, (prompt, answer) in zip(batched, BATCHED_QUERIES):
        alone = quietly(tiny, prompt, answer, method, answer_tokens=answer_tokens)
        assert (found.prompt, found.answer, found.answer_tokens) == (prompt, answer, alone.answer_tokens)
        peak = float(alone.scores.abs().max())
        assert float((found.scores - alone.scores).abs().max()) <= 1e-5 * peak
        assert found.kn_set() == alone.kn_set()
        torch.testing.assert_close(found.f_input, alone.f_input, rtol=1e-5, atol=0)
        torch.testing.assert_close(found.f_baseline, alone.f_baseline, rtol=1e-5, atol=0)
        # The residual is a difference of nearly equal sums: its rounding scales with F, not with it.
        f_scale = float(alone.f_input.max())
        torch.testing.assert_close(
            found.completeness_residual, alone.completeness_residual, rtol=1e-4, atol=1e-5 * f_scale
        )
        assert found.params == alone.params


def test_one_backward_gives_each_query_its_own_gradient(tiny):
    """The batched clean run's one backward of sum_q F_q: queries share no computation across the
    batch dimension, so dF_q/da_q comes out for every q as from a run of q alone, and F at each
    query's zeroed layers as well."""
    queries = [encode_query(tiny, p, a) for p, a in BATCHED_QUERIES if p.endswith("capital of")]
    integrator = PathIntegrator(tiny, NEURONS)
    with frozen_parameters(tiny):
        clean = integrator.clean_batch(
            [q.input_ids for q in queries], [q.answer_ids[0] for q in queries], True
        )
        batched = integrator.input_gradients(clean, None)
        for query, paths in zip(queries, batched):
            alone = integrator.clean_run(query.input_ids, query.answer_ids[0], gradients=True)
            (expected,) = integrator.input_gradients(alone, None)
            torch.testing.assert_close(paths.grad_sums, expected.grad_sums, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(paths.values, expected.values)
            torch.testing.assert_close(paths.f_start, expected.f_start, rtol=1e-5, atol=0)
            assert paths.f_input == pytest.approx(expected.f_input, rel=1e-6)
    with pytest.raises(ValueError, match="one length"):
        integrator.clean_batch([[1, 2, 3], [1, 2]], [4, 5])


@pytest.mark.parametrize("method", list(FIRST_ORDER))
def test_first_order_keeps_the_path_engines_completeness_bookkeeping(tiny, method):
    """F(input), F with each layer at its baseline and the residual are the path engine's at m = 1,
    whatever steps and rule are asked for; small row chunks split the residual rows."""
    found = quietly(tiny, PROMPT, ANSWER, method, steps=9, rule="gauss", max_batch_rows=2)
    one_step = quietly(tiny, PROMPT, ANSWER, FIRST_ORDER[method], steps=1, rule="right")
    torch.testing.assert_close(found.f_input, one_step.f_input)
    torch.testing.assert_close(found.f_baseline, one_step.f_baseline)
    torch.testing.assert_close(found.completeness_residual, one_step.completeness_residual, atol=1e-6, rtol=0)
    assert found.completeness_residual.shape == (1, tiny.num_layers)


def test_residual_is_the_first_order_error_against_a_zeroed_layer(word_tokenizer):
    """An explicit computation: F with layer 1's activation at the target set to 0, by a hook on a
    plain forward, against gxa's F(baseline) and residual."""
    lm = make_tiny_model("llama", word_tokenizer)
    found = attribute(lm, PROMPT, ANSWER, "gxa")
    query = encode_query(lm, PROMPT, ANSWER)
    target, layer = len(query.prompt_ids) - 1, 1

    def zero_at_target(module, args):
        hidden = args[0].clone()
        hidden[:, target] = 0
        return (hidden, *args[1:])

    handle = lm.mlp_out_proj(layer).register_forward_pre_hook(zero_at_target)
    try:
        with torch.no_grad():
            logits = lm.model(torch.tensor([query.prompt_ids])).logits[0, -1]
    finally:
        handle.remove()
    f_zeroed = float(torch.softmax(logits.float(), -1)[query.answer_ids[0]])
    assert float(found.f_baseline[0, layer]) == pytest.approx(f_zeroed, rel=1e-4)
    expected = abs(float(found.scores[layer].sum()) - (float(found.f_input[0]) - f_zeroed))
    assert float(found.completeness_residual[0, layer]) == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_multi_token_answers_average_teacher_forced_tokens(word_tokenizer):
    lm = make_tiny_model("qwen2", word_tokenizer)
    prompt, answer = "The official language of Italy is", "Italian language"
    every = attribute(lm, prompt, answer, "gxa", answer_tokens="all")
    assert_equivalent(every.scores, reference_scores(lm, prompt, answer, "ig", steps=1, answer_tokens="all"))
    assert every.completeness_residual.shape == (2, lm.num_layers) and len(every.answer_tokens) == 2


def test_gxa_sums_to_zero_under_a_normalised_mlp_output(word_tokenizer):
    """Gemma 3's post-feedforward norm: F is flat in a uniform scaling of a layer's activations, so
    sum_i a_i dF/da_i = 0 (Euler) and gxa is degenerate as IG is; gxa-amig is not. The norm's
    epsilon is set to 0: a tiny random model's MLP output is small enough for it to matter."""
    lm = make_tiny_model("gemma3_text", word_tokenizer)
    for layer in lm.layers:
        layer.post_feedforward_layernorm.eps = 0.0
    assert METHODS["gxa"].degenerate_on(lm.arch) and not METHODS["gxa-amig"].degenerate_on(lm.arch)
    with pytest.warns(UserWarning, match="gxa scores"):
        found = attribute(lm, PROMPT, ANSWER, "gxa")
    per_layer = found.scores.sum(1).abs()
    assert (per_layer <= 1e-3 * found.scores.abs().sum(1)).all()
    baseline_aware = quietly(lm, PROMPT, ANSWER, "gxa-amig")
    assert float(baseline_aware.scores.sum(1).abs().max()) > 1e-3 * float(baseline_aware.scores.abs().sum())


def test_model_is_left_exactly_as_before(word_tokenizer):
    lm = make_tiny_model("gpt2", word_tokenizer)
    ids = torch.tensor([[5, 8, 13, 21]])
    with torch.no_grad():
        before = lm.model(ids).logits
    for method in FIRST_ORDER:
        attribute(lm, PROMPT, ANSWER, method)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)
    assert all(not lm.mlp_out_proj(layer)._forward_pre_hooks for layer in range(lm.num_layers))
    assert all(not layer._forward_pre_hooks for layer in lm.layers)
    assert not any(p.grad is not None or p.requires_grad is False for p in lm.model.parameters())


def test_kn_set_rules_apply_as_to_every_method(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    found = attribute(lm, PROMPT, ANSWER, "gxa-amig")
    peak = float(found.scores.max())
    assert peak > 0
    expected = sorted(tuple(u) for u in torch.nonzero(found.scores >= 0.3 * peak).tolist())
    assert found.kn_set(0.3) == expected and found.kn_set() == sorted(found.kn_set())
    assert found.kn_set(top_k=5) == [(layer, i) for layer, i, _ in found.top(5)]


def test_localize_stores_first_order_rows_as_it_does_ig(tmp_path, tiny_model_dir):
    """A tiny localize run with gxa beside IG: the same row kinds per method, KN sets that follow
    from the stored dense scores, residuals, and the run's steps left to IG. The fact's queries,
    attributed together, store what each attributed alone gives."""
    request = localize.LocalizeRequest(
        run_dir=tmp_path / "run",
        model=str(tiny_model_dir),
        config=localize.LocalizeConfig(
            methods=("ig", "gxa", "gxa-amig"), attribution=AttributionSettings(steps=3), save_scores=True
        ),
        selection=Selection(relations="P19,P36", facts_per_relation=1),
        device="cpu",
        execution=Execution(quiet=True),
    )
    localize.run(request)
    with RunStore.open_existing(request.run_dir) as store:
        kn_sets, dense, cas = store.frame("kn_sets"), store.frame("dense_scores"), store.frame("cas_sets")
        assert store.params("localize")["methods"] == ["ig", "gxa", "gxa-amig"]
    per_method = kn_sets.groupby("method").size()
    assert per_method["gxa"] == per_method["ig"] == per_method["gxa-amig"] > 0
    assert set(cas["method"]) == {"ig", "gxa", "gxa-amig"}
    first_order = kn_sets[kn_sets.method.str.startswith("gxa")]
    assert (first_order["max_residual"] >= 0).all() and (first_order["f_input"] > 0).all()
    for row in dense[dense.method == "gxa"].itertuples():
        stored = kn_sets[(kn_sets.fact_id == row.fact_id) & (kn_sets.method == "gxa")]
        stored = stored[stored.query_index == row.query_index].iloc[0]
        scores = torch.from_numpy(load_dense_scores(row.scores_npz).astype("float32"))
        kn = json.loads(stored["kn"])
        assert stored["kn_size"] == len(kn)
        # The dense scores are fp16; a tiny model's are small enough to be subnormal there (step 6e-8).
        assert float(scores.max()) == pytest.approx(stored["max_score"], rel=2e-3, abs=1e-7)
        if kn:
            assert scores[tuple(zip(*kn))].min() >= 0.2 * stored["max_score"] - 1e-7
    lm = qloc.load_model(str(tiny_model_dir), device="cpu")
    for row in first_order.itertuples():
        alone = quietly(lm, row.prompt, row.answer, row.method)
        assert json.loads(row.kn) == [list(u) for u in alone.kn_set()]
        assert row.max_residual == pytest.approx(float(alone.completeness_residual.max()), rel=1e-4, abs=1e-9)


def test_units_of_several_facts_batch_across_facts_and_store_each_fact(tmp_path, tiny_model_dir):
    """``facts_per_unit`` groups consecutive facts into one unit whose queries share passes: the
    same KN sets and scores per query as one fact per unit, every fact's digest recorded, and a
    path method refused (it has nothing to batch)."""
    import sqlite3

    import pandas as pd

    selection = Selection(relations="P19,P36,P101", facts_per_relation=2)

    def run(name: str, facts_per_unit: int, methods: tuple[str, ...] = ("gxa",)) -> pd.DataFrame:
        request = localize.LocalizeRequest(
            run_dir=tmp_path / name,
            model=str(tiny_model_dir),
            config=localize.LocalizeConfig(methods=methods),
            selection=selection,
            facts_per_unit=facts_per_unit,
            device="cpu",
            execution=Execution(quiet=True),
        )
        localize.run(request)
        with RunStore.open_existing(request.run_dir) as store:
            assert store.params("localize").get("facts_per_unit", 1) == facts_per_unit
            kn_sets = store.frame("kn_sets")
        with sqlite3.connect(request.run_dir / "qloc.sqlite") as db:  # every fact's digest, chunked or not
            assert db.execute("SELECT count(*) FROM fact_digests").fetchone()[0] == 6
        return kn_sets

    one = run("one", 1)
    chunked = run("chunked", 4)
    with RunStore.open_existing(tmp_path / "chunked") as store:
        assert len(store.units("localize")) == 2  # 6 facts, 4 and 2
    key = ["fact_id", "query_index"]
    one, chunked = (
        one.sort_values(key).reset_index(drop=True),
        chunked.sort_values(key).reset_index(drop=True),
    )
    assert list(one["fact_id"]) == list(chunked["fact_id"]) and list(one["kn"]) == list(chunked["kn"])
    assert chunked["max_score"].to_numpy() == pytest.approx(one["max_score"].to_numpy(), rel=1e-5)
    with pytest.raises(qloc.QlocError, match="ig attribute query by query"):
        run("path", 4, ("gxa", "ig"))
