"""Text for the terminal. What qloc prints comes from data and users (prompts, answers, rows of a
data file, paths): it is printed as it is, never read as Rich markup (``[/]`` in a prompt is not a
closing tag), and control characters (an ANSI escape in a data file) are shown as escapes instead
of being obeyed by the terminal."""

from __future__ import annotations

import re

from rich.text import Text

CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 and C1 control characters but tab and newline."""


def plain(text: object) -> Text:
    """``text`` as the terminal shows it literally, control characters written as ``\\x1b``."""
    return Text(
        CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode(), str(text))
    )


def labelled(label: str, style: str, text: object) -> Text:
    """``label`` in ``style``, then ``text`` printed literally: ``error: ...``, ``warning: ...``."""
    return Text.assemble((label, style), " ", plain(text))
