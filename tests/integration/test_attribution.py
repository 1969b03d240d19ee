"""The attribution engine against the plain per-layer reference of METHODS.md section 3."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qloc
from qloc.engine.attribution import attribute, kn_set

PROMPT, ANSWER = "Paris is the capital of", "France"


def test_cli_attribute_writes_scores_and_json(tmp_path, tiny_model_dir):
    out = tmp_path / "scores.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qloc.cli",
            "attribute",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--answer",
            ANSWER,
            "--method",
            "amig",
            "--steps",
            "5",
            "--out",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    scores = np.load(out)
    assert scores.dtype == np.float32 and scores.shape == (3, 64) and payload["shape"] == [3, 64]
    lm = qloc.load_model(str(tiny_model_dir), device="cpu")
    assert np.allclose(
        scores, attribute(lm, PROMPT, ANSWER, "amig", steps=5).scores.numpy(), rtol=0, atol=1e-6
    )
    assert payload["kn_set"] == [list(u) for u in kn_set(torch.from_numpy(scores))]
    assert payload["top"][0]["score"] == pytest.approx(float(scores.max()), rel=1e-6)
    assert len(payload["completeness_residual"][0]) == 3
