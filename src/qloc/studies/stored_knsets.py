"""KN sets as run stores hold them, read back: every run's KN sets as one frame
(:func:`load_kn_sets`), KN sets recomputed under other rules from the dense scores a run kept
(:func:`dense_kn_sets`, with the codec of those scores), and the methods degenerate on a run's
architecture. The math on KN sets is :mod:`qloc.studies.knsets`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..engine.architectures import architecture_for
from ..engine.attribution import METHODS
from ..engine.models import model_label
from ..errors import QlocError, UnsupportedArchitectureError
from ..runs.store import RunStore
from .knrows import DenseScoresRow, KnSetRow
from .knsets import KN_RULES, kn_set_by_rule

LOCALIZE_STAGE = "localize"
"""The stage whose KN sets every other study reads (:mod:`qloc.studies.localize`)."""


def compress_scores(scores: np.ndarray) -> bytes:
    """Dense scores as ``localize --save-scores`` stores them: fp16, compressed."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, scores=scores.astype(np.float16))
    return buffer.getvalue()


def load_dense_scores(blob: bytes) -> np.ndarray:
    """The [L, d_ff] fp16 scores stored by ``--save-scores``."""
    return np.load(io.BytesIO(blob))["scores"]


def degenerate_methods(store: RunStore) -> set[str]:
    """Methods degenerate on the architecture of the run's model (from its stored environment)."""
    localize = next((stage for stage in store.stages() if stage["stage"] == LOCALIZE_STAGE), None)
    model_type = ((localize or {}).get("environment") or {}).get("model", {}).get("model_type")
    if model_type is None:
        return set()
    try:
        arch = architecture_for(model_type)
    except UnsupportedArchitectureError:
        return set()
    return {name for name, method in METHODS.items() if method.degenerate_on(arch)}


def load_kn_sets(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """The ``kn_sets`` tables of several runs, with a ``model`` column from each run's parameters
    and ``degenerate`` marking methods that are degenerate on that model's architecture."""
    frames = []
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            model = model_label(store.params(LOCALIZE_STAGE)["model"])
            degenerate = degenerate_methods(store)
            frame = store.frame(KnSetRow)
            frames.append(
                frame.assign(model=model, run_dir=str(run_dir), degenerate=frame["method"].isin(degenerate))
            )
    combined = pd.concat(frames, ignore_index=True)
    duplicated = combined.duplicated(["model", "method", "fact_id", "query_index"])
    if duplicated.any():
        row = combined[duplicated].iloc[0]
        raise QlocError(
            f"runs {sorted(set(combined.run_dir))} both hold {row.method} KN sets of {row.model} fact "
            f"{row.fact_id}; give each (model, method) once"
        )
    return combined


def dense_kn_sets(run_dirs: Sequence[str | Path], rules: Sequence[str] = KN_RULES) -> pd.DataFrame:
    """KN sets recomputed under each rule from the dense scores that ``localize --save-scores``
    stored (fp16: a neuron within fp16 rounding of the cut can fall on the other side than in the
    fp32 sets of ``kn_sets``). Columns as :func:`load_kn_sets`, plus ``kn_rule``; empty where no run
    kept dense scores."""
    rows = []
    for run_dir in run_dirs:
        with RunStore.open_existing(run_dir) as store:
            if "dense_scores" not in store.tables():
                continue
            model = model_label(store.params(LOCALIZE_STAGE)["model"])
            degenerate = degenerate_methods(store)
            relation = store.frame(KnSetRow).drop_duplicates("fact_id").set_index("fact_id")["relation"]
            for row in store.frame(DenseScoresRow).itertuples():
                scores = torch.from_numpy(load_dense_scores(row.scores_npz).astype(np.float32))
                for rule in rules:
                    kn = kn_set_by_rule(scores, rule)
                    rows.append(
                        {
                            "model": model,
                            "fact_id": row.fact_id,
                            "relation": relation[row.fact_id],
                            "method": row.method,
                            "query_index": row.query_index,
                            "kn": kn,
                            "kn_size": len(kn),
                            "kn_rule": rule,
                            "degenerate": row.method in degenerate,
                        }
                    )
    return pd.DataFrame(rows)
