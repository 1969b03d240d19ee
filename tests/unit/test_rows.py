"""Reading results back through their row classes: RunStore.rows and RunStore.frame(RowClass)."""

import math
from dataclasses import dataclass

import pytest

from qloc.errors import RunDirectoryError
from qloc.runs.rows import Row
from qloc.runs.store import RunStore

ENV = {"versions": {}}


@dataclass
class _Old(Row):
    table = "demo_rows"
    fact_id: str
    method: str
    kn: list[list[int]]


@dataclass
class _New(_Old):
    """The same table after its class gained fields (a newer qloc)."""

    count: int = 3
    score: float = float("nan")
    known: bool | None = None
    ranks: list[int] | None = None


def _store_with(tmp_path, rows):
    with RunStore.open_stage(tmp_path, "demo", {}, ENV) as store:
        for i, row in enumerate(rows):
            store.commit_unit("demo", f"u{i}", {row.table: [row]}, None)


def test_rows_round_trip_json_fields_and_filter(tmp_path):
    written = [
        _New("P1/0", "ig", [[0, 1], [2, 3]], 2, 0.5, True, [4, 5]),
        _New("P1/1", "amig", [], 0),
        _New("P1/2", "ig", [[1, 1]], 1, 0.25, known=False),
    ]
    _store_with(tmp_path, written)
    with RunStore.open_existing(tmp_path) as store:
        rows = store.rows(_New)
        assert rows[0] == written[0] and rows[2] == written[2]  # lists back as lists, bools as bools
        assert rows[1].kn == [] and math.isnan(rows[1].score) and rows[1].known is None  # NaN is stored NULL
        assert [r.fact_id for r in store.rows(_New, method="ig")] == ["P1/0", "P1/2"]
        assert store.rows(_New, method="ig", count=1) == [written[2]]
        assert store.rows(_New, method="sig") == []
        frame = store.frame(_New)
        assert frame["kn"].tolist() == [[[0, 1], [2, 3]], [], [[1, 1]]]
        assert isinstance(store.frame("demo_rows")["kn"].iloc[0], str)  # by name: as stored
        with pytest.raises(ValueError, match="no column 'nope'"):
            store.rows(_New, nope=1)


def test_a_table_written_before_its_class_gained_fields_reads_their_defaults(tmp_path):
    _store_with(tmp_path, [_Old("P1/0", "ig", [[0, 1]])])
    with RunStore.open_existing(tmp_path) as store:
        (row,) = store.rows(_New)
        assert (row.fact_id, row.kn, row.count, row.known, row.ranks) == ("P1/0", [[0, 1]], 3, None, None)
        assert math.isnan(row.score)
        assert store.rows(_New, count=3) == [row] and store.rows(_New, count=4) == []
        frame = store.frame(_New)
        assert list(frame.columns) == [
            "stage",
            "unit_id",
            "fact_id",
            "method",
            "kn",
            "count",
            "score",
            "known",
            "ranks",
        ]
        assert frame["count"].tolist() == [3] and frame["known"].tolist() == [None]


def test_reading_a_missing_table_names_it(tmp_path):
    _store_with(tmp_path, [])
    with RunStore.open_existing(tmp_path) as store, pytest.raises(RunDirectoryError, match="demo_rows"):
        store.rows(_New)
