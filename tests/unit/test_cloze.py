"""Cloze scoring against direct forward passes, on tiny and real models, from Python and the CLI."""

import pytest

import qloc
from qloc.errors import DataError
from tests.helpers import direct_scores, make_tiny_model


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
