"""Fixtures every tier shares, and the tiers themselves: tests under ``tests/integration`` (the
``qloc`` command in subprocesses, Ray, kills) and ``tests/acceptance`` (the real models) are marked
``slow``, so that ``pytest -m "not slow"`` runs the unit tier (tiny random models) alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

import qloc
from qloc import cli
from tests.helpers import RELATIONS, Result, build_word_tokenizer, make_tiny_model

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SLOW_TIERS = ("integration", "acceptance")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).parent.name
        if tier in SLOW_TIERS:
            item.add_marker(pytest.mark.slow)
        if tier == "acceptance":
            item.add_marker(pytest.mark.real_model)


@pytest.fixture
def qloc_cli(monkeypatch, capsys):
    """Run ``qloc ARGS`` through the console entry point in this process."""

    def run(*args: str | Path) -> Result:
        monkeypatch.setattr(sys, "argv", ["qloc", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        captured = capsys.readouterr()
        return Result(exit_.value.code or 0, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, word_tokenizer) -> Path:
    """A tiny Llama with its tokenizer saved as a local Hugging Face model directory."""
    lm = make_tiny_model("llama", word_tokenizer)
    directory = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_facts() -> list[qloc.Fact]:
    return qloc.sample_facts(qloc.load_pararel().facts, RELATIONS, 4, seed=0)


def _real_model(name: str) -> qloc.LoadedModel:
    builtin = qloc.BUILTIN_MODELS[name]
    if not builtin.installed():
        pytest.skip(f"{name} is not installed ({builtin.install_command()}); ./setup.sh installs it")
    return qloc.load_model(name, device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> qloc.LoadedModel:
    return _real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> qloc.LoadedModel:
    return _real_model("gemma3-270m")
