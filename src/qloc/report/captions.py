"""The captions of the report's panels: what each table and figure measures, how to read it, and on
how many facts or queries. Each study declares its captions beside it (``captions`` of its
registry entry, by the key it declared the panel under); this module collects them and fills them.

Most captions are templates: ``{facts}``, ``{queries}``, ``{seeds}`` and ``{passes}`` are the values
of those count columns in the panel's first table (``31``, or ``20-200`` where rows differ),
``{rows}`` its number of rows. The few that need more are functions of the tables and the panel."""

from __future__ import annotations

from ..studies import STUDIES
from ..studies.registry import COUNT_COLUMNS, Caption, Frames, Panel, count_text

CAPTIONS: dict[str, Caption] = {key: text for study in STUDIES for key, text in study.captions.items()}
"""Every study's captions, by panel key."""


def caption(key: str, frames: Frames, panel: Panel) -> str:
    """The caption of a panel declared under ``key``; none for a panel no study declares."""
    declared = CAPTIONS.get(key)
    if declared is None:
        return ""
    if not isinstance(declared, str):
        return declared(frames, panel)
    frame = frames.get(panel.tables[0]) if panel.tables else None
    counts = {c: count_text(frame, c) for c in COUNT_COLUMNS} if frame is not None else {}
    rows = f"{len(frame):,}" if frame is not None else "?"
    return declared.format(rows=rows, **counts)
