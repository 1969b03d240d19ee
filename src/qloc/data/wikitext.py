"""The WikiText-2 (raw) test split shipped with qloc, for the perplexity check of knowledge editing."""

from __future__ import annotations

import gzip
import random
from collections.abc import Collection

from .pararel import bundled_path


def load_wikitext_test() -> str:
    """The whole test split as one string, CRLF normalised to LF."""
    with gzip.open(bundled_path("wikitext2_test.raw.gz"), "rt", encoding="utf-8") as f:
        return f.read().replace("\r\n", "\n")


def wikitext_passages(
    count: int = 5, min_chars: int = 1200, seed: int | str = 0, exclude: Collection[str] = ()
) -> list[str]:
    """``count`` seeded passages: article paragraphs (lines that are not ``= heading =``) of at
    least ``min_chars`` characters, enough for 256 tokens with the usual tokenizers, none of
    ``exclude`` (passages another measurement uses)."""
    paragraphs = [
        line.strip()
        for line in load_wikitext_test().split("\n")
        if len(line.strip()) >= min_chars and not line.strip().startswith("=")
    ]
    left_out = set(exclude)
    return random.Random(seed).sample([p for p in paragraphs if p not in left_out], count)
