"""One number format for every table, caption and claim (no scientific notation for ordinary
magnitudes, so that absurd ones stand out), and shares as percentages with their counts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ORDINARY = (1e-3, 1e6)
"""Magnitudes written as plain decimals; smaller and larger ones as m×10^e."""


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
