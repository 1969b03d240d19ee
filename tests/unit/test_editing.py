"""KN editing: restore is bit-exact, one neuron touches one value vector, updates move the answer."""

import math

import pytest
import torch

import qloc
from qloc.engine.editing import answer_embedding, edit_knowledge, perplexity
from tests.helpers import make_tiny_model

PROMPT = "Paris is the capital of"


def weights(lm):
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def before_vector(saved, lm, layer, index):
    name = next(n for n, p in lm.model.named_parameters() if p is lm.mlp_out_proj(layer).weight)
    weight = saved[name]
    return weight[index] if lm.arch.value_vector_axis == "row" else weight[:, index]


def before_vector_matrix(saved, lm, layer):
    return saved[next(n for n, p in lm.model.named_parameters() if p is lm.mlp_out_proj(layer).weight)]


def tied_gated_model(word_tokenizer, seed: int = 0):
    """A tiny Llama whose output head is its input embedding, as in SmolLM2 and Gemma: moving the
    residual stream along e(o) moves o's logit."""
    import transformers

    from tests.helpers import tiny_config

    torch.manual_seed(seed)
    config = tiny_config("llama", len(word_tokenizer))
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return qloc.wrap_model(model, word_tokenizer, name="tiny-tied-llama")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_edit_then_restore_is_bit_identical(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    before = weights(lm)
    with edit_knowledge(lm, [(0, 1), (2, 5), (2, 7)], "France", "Italy"):
        assert not torch.equal(lm.value_vectors(2)[5], before_vector(before, lm, 2, 5))
    with pytest.raises(RuntimeError):
        with edit_knowledge(lm, [(1, 3)], "France"):
            raise RuntimeError("crash inside the edit")
    assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_one_neuron_changes_exactly_one_value_vector(word_tokenizer, model_type):
    lm = make_tiny_model(model_type, word_tokenizer)
    before = weights(lm)
    with edit_knowledge(lm, [(1, 4)], "France"):
        changed = {name for name, p in lm.model.named_parameters() if not torch.equal(p, before[name])}
        weight = lm.mlp_out_proj(1).weight
        assert changed == {next(n for n, p in lm.model.named_parameters() if p is weight)}
        diff = (weight != before_vector_matrix(before, lm, 1)).nonzero()
        axis = 0 if lm.arch.value_vector_axis == "row" else 1
        assert set(diff[:, axis].tolist()) == {4}
        # Erasure by Dai et al.'s scaling: v - ||v|| e / ||e||
        original = before_vector(before, lm, 1, 4).float()
        e = answer_embedding(lm, "France")
        torch.testing.assert_close(lm.value_vectors(1)[4], original - original.norm() / e.norm() * e)


def test_update_moves_the_answer_towards_the_new_object(word_tokenizer):
    """Tied embeddings (GPT-2): adding e(o') to value vectors raises o''s logit by construction."""
    lm = make_tiny_model("gpt2", word_tokenizer)
    neurons = [(layer, i) for layer in range(lm.num_layers) for i in range(0, lm.d_ff, 4)]
    before = qloc.score_cloze(lm, [PROMPT, PROMPT], ["France", "Italy"])
    # Dai et al.'s weight: a random model's neurons carry no fact, and lambda2 = 2 moves o' less.
    with edit_knowledge(lm, neurons, "France", "Italy", lambda2=8.0):
        after = qloc.score_cloze(lm, [PROMPT, PROMPT], ["France", "Italy"])
    assert before[1].rank > 100 and after[1].rank == 0 and after[1].accuracy == 1.0
    assert after[1].prob > 2 * before[1].prob
    assert after[1].logprob - after[0].logprob > before[1].logprob - before[0].logprob
    assert qloc.score_cloze(lm, [PROMPT], ["Italy"])[0].prob == pytest.approx(before[1].prob, rel=1e-6)


def test_half_precision_edit_computes_in_fp32_and_restores(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    lm.model.to(torch.bfloat16)
    before = weights(lm)
    with edit_knowledge(lm, [(0, 2)], "France", "Italy"):
        assert lm.value_vectors(0).dtype == torch.bfloat16
    assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())


def test_perplexity_matches_a_direct_computation(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    passages = ["Paris is the capital of France", "The official language of Italy is Italian language"]
    total, count = 0.0, 0
    for text in passages:
        ids = torch.tensor([word_tokenizer(text).input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(ids).logits[0, :-1], -1)
        total += float(logprobs.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert perplexity(lm, passages) == pytest.approx(torch.exp(torch.tensor(-total / count)).item(), rel=1e-5)


def test_edit_metrics_on_hand_made_predictions():
    from qloc.studies.edit_measures import edit_metrics

    update = edit_metrics("update", 1.0, [0.5, 0.0, 1.0], [[1, 2], [3], [4]], [[1, 2], [9], [4]])
    assert update == {
        "rel": 1.0,
        "gen": 0.5,
        "loc": pytest.approx(2 / 3),
        "avg": pytest.approx((1 + 0.5 + 2 / 3) / 3),
    }
    erase = edit_metrics("erase", 1.0, [1.0, 0.0], [[1]], [[1]])
    assert (erase["rel"], erase["gen"], erase["loc"]) == (0.0, 0.5, 1.0)


def test_sequential_editing_restores_the_model(word_tokenizer):
    import pandas as pd

    from qloc.studies.edit_measures import EditConfig, sequential_edit, sequential_table
    from qloc.studies.knsets import FactKNSets, SharedNeuronFilter

    lm = make_tiny_model("llama", word_tokenizer)
    facts = [
        qloc.Fact(f"P1/{i}", "P1", "P1(x)", s, o, (f"{s} is the capital of", f"The capital {s} belongs to"))
        for i, (s, o) in enumerate([("Paris", "France"), ("Rome", "Italy"), ("Berlin", "Germany")])
    ]
    knowledge = {f.id: FactKNSets([[(0, i), (1, i + 1)], [(0, i)]], [(0, i)]) for i, f in enumerate(facts)}
    before = weights(lm)

    def in_sequence(set_name: str, repeat: int) -> dict:
        config, shared = EditConfig(mode="update", unrelated_queries=2), SharedNeuronFilter(0.1, knowledge)
        passages = ["Paris is the capital of France"]
        return sequential_edit(lm, config, knowledge, shared, facts, facts, set_name, 2, repeat, passages)

    rows = []
    for repeat in range(2):
        result = in_sequence("union", repeat)
        assert result["facts"] == 2 and 0 <= result["loc"] <= 1
        rows.append({"method": "ig", "mode": "update", "kn_set": "union", "seed": repeat, **result})
    # The random control edits as many non-KN neurons in sequence, and restores the model too.
    control = in_sequence("random", 0)
    assert control["facts"] == 2 and control["empty_sets"] == 0
    assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())
    table = sequential_table(pd.DataFrame(rows))
    assert table.loc[0, "seeds"] == 2 and "rel_std" in table


def test_the_random_control_set_has_selfs_size_and_no_kn_of_the_fact():
    from qloc.studies.edit_measures import EditConfig, edit_set
    from qloc.studies.knsets import FactKNSets

    original = FactKNSets([[(0, 1), (1, 2), (9, 9)], [(0, 1), (2, 3)]], [(3, 4)], "P1")
    filtered = original.without({(9, 9)})
    control = edit_set(original, filtered, "random", (4, 6), "0:random:P1/0")
    assert len(control) == len(filtered.kn_set("self")) == 2
    assert not set(control) & (original.neurons | {(3, 4)})
    assert control == edit_set(original, filtered, "random", (4, 6), "0:random:P1/0")  # seeded
    assert edit_set(original, filtered, "self", (4, 6), "") == [(0, 1), (1, 2)]
    assert EditConfig(sets=("self", "random")).sets == ("self", "random")
    with pytest.raises(qloc.QlocError, match="choose from self, union, cas, random"):
        EditConfig(sets=("everything",))


def test_case_study_table_and_restore(word_tokenizer):
    from qloc.studies.edit_measures import case_study, greedy_continuation

    lm = make_tiny_model("gpt2", word_tokenizer)
    before = weights(lm)
    queries = ["Paris is the capital of", "Paris, that is the capital city of"]
    table = case_study(
        lm, queries, "France", "Italy", method="ig", set_name="union", steps=3, max_new_tokens=4
    )
    assert list(table.role) == ["query", "neighbour"] and table.kn_size[0] > 0
    assert table.before[0] == greedy_continuation(lm, queries[0], 4)
    assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_aware_erasure_lowers_the_answer_on_a_gated_model(word_tokenizer, seed):
    """Gated activations are signed. Eq. (2) applied literally to neurons with a < 0 adds
    |a| ||v|| e(o) / ||e(o)|| to the residual stream and raises the answer; following each
    activation's sign lowers it."""
    from qloc.engine.editing import activation_signs, target_activations

    lm = tied_gated_model(word_tokenizer, seed)
    answer = "France"
    activations = target_activations(lm, [PROMPT], answer)
    last = lm.num_layers - 1
    ranked = activations[0, last].abs().argsort(descending=True)[:16].tolist()
    neurons = [(last, i) for i in ranked]
    signs = activation_signs(activations, neurons)
    negative = [u for u, sign in zip(neurons, signs) if sign < 0]
    assert 0 < len(negative) < len(neurons)  # both signs present: the case the rule is for
    before = qloc.score_cloze(lm, [PROMPT], [answer])[0].prob
    with edit_knowledge(lm, neurons, answer, signs=signs):
        aware = qloc.score_cloze(lm, [PROMPT], [answer])[0].prob
    with edit_knowledge(lm, negative, answer):  # the literal equation on the negative ones
        literal = qloc.score_cloze(lm, [PROMPT], [answer])[0].prob
    assert aware < before < literal


def test_sign_zero_leaves_a_neuron_unedited(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    before = weights(lm)
    with edit_knowledge(lm, [(0, 1), (1, 2)], "France", signs=[0, -1]):
        assert torch.equal(lm.value_vectors(0)[1], before_vector(before, lm, 0, 1))
        original = before_vector(before, lm, 1, 2).float()
        e = answer_embedding(lm, "France")
        torch.testing.assert_close(lm.value_vectors(1)[2], original + original.norm() / e.norm() * e)
    with pytest.raises(qloc.QlocError, match="2 signs for 1 neurons"):
        with edit_knowledge(lm, [(0, 1)], "France", signs=[1, 1]):
            pass


def test_signs_follow_the_mean_activation():
    from qloc.engine.editing import activation_signs

    activations = torch.zeros(3, 2, 4)
    activations[:, 0, 1] = torch.tensor([2.0, -1.0, -0.5])  # mean +0.17
    activations[:, 1, 3] = torch.tensor([-2.0, 1.0, 0.5])  # mean -0.17
    assert activation_signs(activations, [(0, 1), (1, 3), (1, 0)]) == [1, -1, 0]
    assert activation_signs(activations[1:2], [(0, 1), (1, 3)]) == [-1, 1]  # Self: the edited query alone


def test_shared_filter_drops_neurons_many_facts_hold():
    from qloc.studies.knsets import FactKNSets, SharedNeuronFilter, shared_neurons

    common, relation_only = (9, 9), (8, 8)
    knowledge = {}
    for i in range(12):  # relation P1 has 12 facts: shares are counted within it
        sets = [[(0, i), common], [(1, i)] + ([relation_only] if i < 2 else [])]
        knowledge[f"P1/{i}"] = FactKNSets(sets, [(0, i), common], "P1")
    for i in range(3):  # P2 has 3 facts (< 10): counted over all 15 facts of the run
        knowledge[f"P2/{i}"] = FactKNSets([[(2, i), common], [(2, i)]], [common], "P2")
    removed = shared_neurons(knowledge, 0.10, min_facts=10)
    # common: 15 facts (> 1.2 of P1's 12, > 1.5 of all 15); relation_only: 2 of P1's 12 facts (> 1.2).
    assert removed["P1/0"] == {common, relation_only} and removed["P1/5"] == {common}
    assert removed["P2/1"] == {common}
    assert shared_neurons(knowledge, 0.2, min_facts=10)["P1/0"] == {common}  # 2 of 12 is not above 20 %
    filtered = SharedNeuronFilter(0.10, knowledge, min_facts=10).apply(knowledge)
    assert filtered["P1/0"].kn_set("self") == [(0, 0)] and filtered["P2/0"].kn_set("cas") == []
    assert filtered["P1/0"].query_sets[1] == [(1, 0)]
    assert SharedNeuronFilter(None, knowledge).apply(knowledge)["P1/0"].kn_set("self") == [(0, 0), common]
    # A neuron of one fact is never shared, however few facts the run has.
    pair = {
        "P3/0": FactKNSets([[(0, 0)], [(0, 0)]], [], "P3"),
        "P4/0": FactKNSets([[(1, 1)], [(1, 1)]], [], "P4"),
    }
    assert shared_neurons(pair, 0.1, min_facts=2) == {"P3/0": frozenset(), "P4/0": frozenset()}
    with pytest.raises(qloc.QlocError, match="share 1.5"):
        shared_neurons(knowledge, 1.5)


def test_shared_filter_counts_small_relation_samples_over_the_run():
    """Three of a sampled relation's 20 facts sharing their answer's neuron is above 10 % of the
    relation but not of the run's 50 facts: by default (relations under 50 facts count over the
    run) it stays; counted within the relation, it would go."""
    from qloc.studies.knsets import FactKNSets, shared_neurons

    answer = (5, 5)
    knowledge = {}
    for i in range(20):
        sets = [[(0, i)] + ([answer] if i < 3 else []), [(0, i)]]
        knowledge[f"P5/{i}"] = FactKNSets(sets, [], "P5")
    for i in range(30):
        knowledge[f"P6/{i}"] = FactKNSets([[(1, i)], [(1, i)]], [], "P6")
    assert shared_neurons(knowledge, 0.1)["P5/0"] == frozenset()
    assert shared_neurons(knowledge, 0.1, min_facts=10)["P5/0"] == {answer}


def _score(accuracy: float, rank: int, prob: float):
    from qloc.engine.cloze import ClozeScore

    return ClozeScore("q", "o", [1], prob, rank, 0.0, "o", [1], accuracy)


def test_erasure_evidence_says_which_queries_the_model_knew():
    from qloc.studies.edit_measures import Measurement, edit_evidence

    # The edited query and one neighbour were answered right before; one neighbour never was.
    before = Measurement([_score(1.0, 0, 0.6), _score(1.0, 0, 0.5), _score(0.0, 7, 0.01)], None, [])
    after = Measurement([_score(0.0, 3, 0.1), _score(1.0, 0, 0.4), _score(0.0, 9, 0.005)], None, [])
    evidence = edit_evidence("erase", before, after)
    # Gen counts the neighbour the model never knew as erased; over known neighbours it failed.
    assert evidence["gen"] == 0.5 and evidence["gen_known"] == 0.0
    assert evidence["query_known"] is True and evidence["neighbours_known"] == 1
    unknown = Measurement([_score(0.0, 4, 0.02), *before.old[1:]], None, [])
    assert edit_evidence("erase", unknown, after)["query_known"] is False
    nobody = Measurement([before.old[0], _score(0.0, 2, 0.1), _score(0.0, 7, 0.01)], None, [])
    assert math.isnan(edit_evidence("erase", nobody, after)["gen_known"])


def test_edit_table_reports_erasure_over_known_queries_and_not_stored_for_old_rows():
    import pandas as pd

    from qloc.studies.editing import edit_table

    def row(fact, rel, gen, known, neighbours_known, gen_known, before, after, size=3):
        return {
            "fact_id": fact,
            "method": "amig",
            "mode": "erase",
            "kn_set": "self",
            "class": "KI",
            "kn_size": size,
            "kn_dropped": 0,
            "rel": rel,
            "gen": gen,
            "loc": 1.0,
            "avg": 1.0,
            "dppl": 0.0,
            "prob_before": before,
            "prob_after": after,
            "query_known": known,
            "neighbours_known": neighbours_known,
            "gen_known": gen_known,
        }

    rows = [
        row("a", 0.0, 0.5, True, 2, 0.0, 0.6, 0.5),  # known and not erased
        row("b", 1.0, 1.0, False, 0, float("nan"), 0.01, 0.02),  # never known: Rel 1 for free
        row("c", 1.0, 1.0, True, 1, 1.0, 0.4, 0.0),  # known and erased
        row("d", None, None, None, None, float("nan"), None, None, size=0),  # empty set, not edited
    ]
    table = edit_table(pd.DataFrame(rows), ("self",)).iloc[0]
    assert table["rel"] == pytest.approx(2 / 3) and table["rel_known"] == 0.5
    # Gen that every paraphrase can fail: the share of neighbours whose P(o) fell, per edited fact.
    moved = pd.DataFrame(rows).assign(neighbours=[2, 4, 1, 0], neighbours_moved=[1, 4, 1, 0])
    assert edit_table(moved, ("self",)).iloc[0]["gen_moved"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert table["known_queries"] == 2 and table["known_neighbours"] == 3
    assert table["gen_known"] == 0.5 and table["prob_drop"] == pytest.approx((0.1 - 0.01 + 0.4) / 3)
    assert table["facts"] == 4 and table["empty_sets"] == 1
    assert table["kn_dropped_total"] == 0 and table["emptied_by_filter"] == 0
    # A store written before the known columns were recorded: the old columns as they were, the
    # new ones NaN (not stored), except the drop of P(o), which older rows already hold.
    old = pd.DataFrame(rows).drop(columns=["query_known", "neighbours_known", "gen_known"])
    old_table = edit_table(old, ("self",)).iloc[0]
    assert old_table["rel"] == table["rel"] and old_table["prob_drop"] == table["prob_drop"]
    assert old_table[["rel_known", "known_queries", "gen_known", "known_neighbours"]].isna().all()


def test_reproduce_edits_the_papers_100_facts_in_a_row_at_full_scale():
    from qloc.studies.editing import reproduce
    from qloc.studies.registry import Reproduction

    full = dict(reproduce(Reproduction(scale="full")))["sequential update"]
    assert (full.sequential, full.seeds) == (100, 5)
    # --facts makes the run smaller: sequential editing takes at most all of its facts.
    assert dict(reproduce(Reproduction(scale="full", facts=30)))["sequential update"].sequential == 30


def test_shared_filter_report_counts_what_the_filter_removes_per_set_kind():
    from qloc.studies.knsets import FactKNSets, SharedNeuronFilter

    common = (9, 9)
    knowledge = {
        f"P1/{i}": FactKNSets([[common], [(0, i), common]], [common, (1, i)], "P1") for i in range(4)
    }
    report = SharedNeuronFilter(0.1, knowledge, min_facts=4).report(knowledge)
    # Only the neuron every fact holds goes; it was each Self set's only KN.
    assert report.startswith("shared-neuron filter 0.1 (shares over 4 facts of this run): drops 1 distinct")
    assert "self 4 KNs, 4 of 4 sets emptied" in report and "union 4 KNs, 0 of 4 sets emptied" in report
    assert "cas 4 KNs, 0 of 4" in report
    assert SharedNeuronFilter(None, knowledge).report(knowledge) == "shared-neuron filter off"


def test_shared_filter_needs_enough_facts_and_takes_them_from_a_reference():
    """On 12 facts of 4 relations (3 each), "held by more than 10 % of the facts" means "held by
    two": such a run is not filtered, and says so; a larger reference run of the model counts the
    shares instead, so a neuron of a few of its facts stays and one of most of them goes."""
    from qloc.studies.knsets import FactKNSets, SharedNeuronFilter

    everywhere, pair = (29, 0), (28, 5)
    small = {
        f"P{r}/{i}": FactKNSets([[(r, i), everywhere] + ([pair] if i < 2 else []), [(r, i)]], [], f"P{r}")
        for r in range(1, 5)
        for i in range(3)
    }
    unfiltered = SharedNeuronFilter(0.1, small)  # the default pool is the run itself: 12 < 50 facts
    assert all(not dropped for dropped in unfiltered.removed(small).values())
    assert unfiltered.apply(small)["P1/0"].kn_set("self") == [(1, 0), everywhere, pair]
    assert unfiltered.report(small).startswith(
        "shared-neuron filter 0.1 not applied: this run has 12 facts, fewer than the 50"
    )
    reference = {
        f"P{r}/{i}": FactKNSets([[(r, i), everywhere] + ([pair] if i < 2 else []), [(r, i)]], [], f"P{r}")
        for r in range(1, 6)
        for i in range(20)
    }
    counted = SharedNeuronFilter(0.1, reference, "reference run 'big'")
    filtered = counted.apply(small)
    # 100 facts, each relation's 20 below 50: shares over all 100; "pair" is in 10 of them (not > 10).
    assert filtered["P1/0"].kn_set("self") == [(1, 0), pair] and filtered["P1/2"].kn_set("self") == [(1, 2)]
    report = counted.report(small, ("self",))
    assert "shares over 100 facts of reference run 'big'" in report and "self 12 KNs, 0 of 12" in report


def test_edits_in_sequence_scale_by_the_unedited_norms(word_tokenizer):
    """A neuron edited twice in a row with the unedited norms changes twice as much as once (with
    the norms as they are after the first edit, the second edit would be larger: compounding)."""
    from qloc.engine.editing import edit_knowledge, value_norms

    lm = make_tiny_model("llama", word_tokenizer)
    neuron, layer = (1, 3), 1
    original = lm.value_vectors(layer)[3].clone().float()
    unedited = value_norms(lm)
    with edit_knowledge(lm, [neuron], "France", "Italy", norms=unedited):
        once = lm.value_vectors(layer)[3].float() - original
        with edit_knowledge(lm, [neuron], "France", "Italy", norms=unedited):
            twice = lm.value_vectors(layer)[3].float() - original
        with edit_knowledge(lm, [neuron], "France", "Italy"):
            compounded = lm.value_vectors(layer)[3].float() - original
    assert torch.allclose(twice, 2 * once, atol=1e-5)
    assert compounded.norm() > 2.5 * once.norm()  # the current norm grew with the first edit
    assert torch.equal(lm.value_vectors(layer)[3].float(), original)
