"""Cloze scoring against direct forward passes, on tiny and real models, from Python and the CLI."""

import json

import pytest

from tests.helpers import direct_scores, run_cli


@pytest.mark.real_model
@pytest.mark.parametrize("name, fixture", [("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3")])
def test_cli_cloze_matches_direct_forward_pass(name, fixture, request):
    lm = request.getfixturevalue(fixture)
    result = run_cli(
        "cloze",
        "--model",
        name,
        "--relations",
        "P36,P19,P103",
        "--facts-per-relation",
        "1",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len({r["fact_id"] for r in records}) == 3 and len(records) >= 6
    for record in records:
        prob, rank, logprob = direct_scores(lm, record["prompt"], record["answer"])
        assert record["prob"] == pytest.approx(prob, rel=1e-4, abs=1e-7)
        assert record["rank"] == rank
        assert record["logprob"] == pytest.approx(logprob, rel=1e-4, abs=1e-5)


@pytest.mark.real_model
def test_single_prompt_json(smollm2):
    result = run_cli(
        "cloze",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The Eiffel Tower is located in the city of",
        "--answer",
        "Paris",
        "--json",
        "--device",
        "cpu",
    )
    payload = json.loads(result.stdout)
    assert (
        payload["rank"] == 0
        and payload["answer_tokens"] == smollm2.tokenizer(" Paris", add_special_tokens=False).input_ids
    )
    prob, _, logprob = direct_scores(smollm2, "The Eiffel Tower is located in the city of", "Paris")
    assert payload["prob"] == pytest.approx(prob, rel=1e-5) and payload["prob"] == pytest.approx(
        0.70, abs=0.01
    )
    assert payload["logprob"] == pytest.approx(logprob, rel=1e-5)
