"""The paper's tables as data (``paper_reference.json`` beside this module): every cell of Chen et
al.'s Tables 1-4, 6 and 7 as records, with the source lines, the rebuilt labels and the paper's own
inconsistencies said under each table. The report's quotes are built on it
(:mod:`qloc.studies.paper`); studies read the cells they draw beside their figures."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import QlocError


def paper_reference_data(path: Path | None = None) -> dict[str, Any]:
    """The reference file shipped with qloc, or another of the same form, checked for its parts."""
    source = path or resources.files("qloc.data") / "paper_reference.json"
    try:
        data = json.loads(Path(str(source)).read_text(encoding="utf-8"))
        if missing := [key for key in ("paper", "reference_models", "tables", "claims") if key not in data]:
            raise KeyError(f"no {', '.join(missing)}")
        for name, table in data["tables"].items():
            if not isinstance(table.get("rows"), list) or not all(isinstance(r, dict) for r in table["rows"]):
                raise ValueError(f"table {name!r} has no list of records in 'rows'")
        for name, claim in data["claims"].items():
            missing = [key for key in ("where", "claim") if key not in claim]
            if missing:
                raise KeyError(f"claim {name!r} has no {', '.join(missing)}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QlocError(f"paper reference {str(source)!r} cannot be read: {exc!r}") from None
    return data


def paper_table(name: str, path: Path | None = None) -> pd.DataFrame:
    """One of the paper's tables (``table1``, ``table1_u_ki``, ``table2`` ... ``table7``) as a DataFrame."""
    return pd.DataFrame(paper_reference_data(path)["tables"][name]["rows"])
