"""How the report writes numbers and embeds data: one number format for every table (no scientific
notation for ordinary magnitudes, so that absurd ones stand out), and JSON that is safe inside an
HTML ``<script>`` element whatever text the facts and prompts hold."""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

import numpy as np

ORDINARY = (1e-3, 1e6)
"""Magnitudes written as plain decimals; smaller and larger ones as m×10^e."""

_POWER = re.compile(r"×10\^(-?\d+)")


def format_number(value: Any) -> str:
    """Plain text: ``0.603``, ``373.68``, ``1,050``, ``31``, ``1.2×10^52``, ``3.4×10^-5``; ``–``
    for missing values. Non-numbers are returned as their text."""
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if not isinstance(value, float | np.floating):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    magnitude = abs(value)
    if value == 0:
        return "0"
    if magnitude < ORDINARY[0] or magnitude >= ORDINARY[1]:
        exponent = math.floor(math.log10(magnitude))
        mantissa = value / 10**exponent
        if round(abs(mantissa), 1) >= 10:  # 9.96 rounds up to 10.0: carry into the exponent
            mantissa, exponent = mantissa / 10, exponent + 1
        return f"{mantissa:.2g}×10^{exponent}"
    if value.is_integer():
        return f"{int(value):,}"
    digits = 3 if magnitude < 10 else 2 if magnitude < 1000 else 0
    return f"{value:,.{digits}f}"


def format_share(share: float, total: int | None = None) -> str:
    """A share of 0..1 as a percentage, with the count it is of: ``12.9 % (4 of 31)``."""
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return "–"
    text = f"{100 * share:.1f} %"
    if total is not None:
        text += f" ({round(share * total):,} of {total:,})"
    return text


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
