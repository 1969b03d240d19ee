"""How the report writes numbers into HTML and embeds data: :func:`qloc.numbers.format_number` with
powers of ten as superscripts, and JSON that is safe inside an HTML ``<script>`` element whatever
text the facts and prompts hold."""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

import numpy as np

from ..numbers import format_number

_POWER = re.compile(r"×10\^(-?\d+)")


def escape(text: Any) -> str:
    """Text as HTML: ``html.escape``, and U+2028/U+2029 as character references (harmless in HTML
    text, but kept out of the page so that no copy of it can reach a script)."""
    return html.escape(str(text)).replace("\u2028", "&#8232;").replace("\u2029", "&#8233;")


def number_html(value: Any) -> str:
    """:func:`format_number` as escaped HTML, powers of ten as superscripts."""
    return _POWER.sub(r"×10<sup>\1</sup>", escape(format_number(value)))


def rounded(value: Any, digits: int = 4) -> Any:
    """A float cut to ``digits`` significant digits for embedding (NaN and inf become None: JSON
    has neither); other values unchanged."""
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}")
    if isinstance(value, np.integer):
        return int(value)
    return value


def script_json(data: Any) -> str:
    """JSON for a ``<script type="application/json">`` element. ``<``, ``>`` and ``&`` are written
    as \\u escapes, so no text (``</script>``, ``<!--``) can end the element or open a comment; so
    are U+2028/U+2029, which older JavaScript parsers take for line ends."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text
