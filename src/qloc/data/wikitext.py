"""The WikiText-2 (raw) test split shipped with qloc, for the perplexity check of knowledge editing."""

from __future__ import annotations

import gzip
import random

from .pararel import bundled_path


def load_wikitext_test() -> str:
    """The whole test split as one string, CRLF normalised to LF."""
    with gzip.open(bundled_path("wikitext2_test.raw.gz"), "rt", encoding="utf-8") as f:
        return f.read().replace("\r\n", "\n")


def wikitext_passages(count: int = 5, min_chars: int = 1200, seed: int = 0) -> list[str]:
    """``count`` seeded passages: article paragraphs (lines that are not ``= heading =``) of at
    least ``min_chars`` characters, enough for 256 tokens with the usual tokenizers."""
    paragraphs = [
        line.strip()
        for line in load_wikitext_test().split("\n")
        if len(line.strip()) >= min_chars and not line.strip().startswith("=")
    ]
    return random.Random(seed).sample(paragraphs, count)
