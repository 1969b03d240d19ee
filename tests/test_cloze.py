"""Cloze scoring against direct forward passes, on tiny and real models, from Python and the CLI."""

import json

import pytest
import torch

import qloc
from conftest import make_tiny_model
from qloc.errors import DataError
from test_models import run_cli


def direct_scores(lm, prompt, answer):
    """Probability and rank of answer token 0 and the teacher-forced log-probability, one
    unbatched forward pass without qloc's batching."""
    prompt_ids = lm.tokenizer(prompt).input_ids
    answer_ids = lm.tokenizer(" " + answer, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    first = logprobs[len(prompt_ids) - 1]
    total = sum(float(logprobs[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(answer_ids))
    return float(first[answer_ids[0]].exp()), int((first > first[answer_ids[0]]).sum()), total


def test_batched_scores_equal_unbatched(word_tokenizer):
    lm = make_tiny_model("gpt2", word_tokenizer)
    prompts = [
        "Paris is the capital of",
        "The official language of Italy is",
        "Obsidian Entertainment is based in",
    ]
    answers = ["France", "Italian language", "Irvine"]
    batched = qloc.score_cloze(lm, prompts, answers, batch_size=3)
    for score, prompt, answer in zip(batched, prompts, answers):
        prob, rank, logprob = direct_scores(lm, prompt, answer)
        assert score.prob == pytest.approx(prob, rel=1e-5)
        assert score.rank == rank
        assert score.logprob == pytest.approx(logprob, rel=1e-5)
    assert len(batched[1].answer_tokens) == 2


def test_answer_that_tokenizes_to_nothing(word_tokenizer):
    lm = make_tiny_model("llama", word_tokenizer)
    with pytest.raises(DataError, match="answer '  '"):
        qloc.score_cloze(lm, ["Paris is the capital of"], ["  "])


def test_blank_answers_are_malformed_rows_named_by_the_cli(tmp_path, tiny_model_dir):
    data = {
        "P1": [
            [["X is in [MASK].", " ", "P1(x)"], ["X lies in [MASK].", " ", "P1(x)"]],
            [
                ["Paris is the capital of [MASK].", "France", "P1(x)"],
                ["The capital of France is [MASK].", "France", "P1(x)"],
            ],
        ]
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    result = run_cli(
        "cloze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "fact P1/0 row 0" in result.stderr and "1 done" in result.stdout


class NoTokensFor:
    """Tokenizer wrapper that turns one answer into no tokens (as a tokenizer without the
    answer's characters might)."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer = tokenizer, answer

    def __call__(self, text, **kwargs):
        encoded = self.tokenizer(text, **kwargs)
        if text.strip() == self.answer:
            encoded["input_ids"] = []
        return encoded

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)


def test_sweep_skips_and_names_untokenizable_answers(tmp_path, word_tokenizer):
    from qloc.runs.sweep import run_sweep
    from qloc.studies.cloze import cloze_sweep_work

    lm = make_tiny_model("llama", NoTokensFor(word_tokenizer, "France"))
    facts = [
        qloc.Fact("P1/0", "P1", "P1(x)", "Paris", "France", ("Paris is the capital of", "The capital is")),
        qloc.Fact("P1/1", "P1", "P1(x)", "Rome", "Italy", ("Rome is the capital of", "Its capital is")),
    ]
    with qloc.RunStore.open_stage(tmp_path, "cloze", {}) as store:
        summary = run_sweep(store, "cloze", facts, cloze_sweep_work(lm), quiet=True)
        units = store.units("cloze").set_index("unit_id")
    assert summary.skip_reasons == {"answer not tokenizable": 1} and summary.done == 1
    assert "P1/0" in units.loc["P1/0", "reason"] and "'France'" in units.loc["P1/0", "reason"]


def test_cli_input_errors_exit_2_with_a_message():
    result = run_cli("cloze", "--prompt", "only a prompt")
    assert result.returncode == 2 and "--prompt and --answer go together" in result.stderr
    result = run_cli("facts", "--relations", "P19,P0")
    assert result.returncode == 2 and "P0" in result.stderr and "Traceback" not in result.stderr


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
