"""Knowledge synapses: the attention-probability intervention point on every family, attention
attribution against a direct per-layer reference, KS selection, the tables, and the CLI."""

import json
import subprocess
import sys

import pandas as pd

import qloc
from tests.helpers import localize_tiny


def test_cli_synapses_end_to_end_and_resume(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "qloc.cli"]
    localize_tiny(tiny_model_dir, run, "--relations", "P19,P36")
    command = base + ["synapses", "--run-dir", str(run), "--steps", "3", "--device", "cpu", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with qloc.RunStore.open_existing(run) as store:
        queries = store.frame("kn_sets").shape[0]
        found, effects = store.frame("synapses"), store.frame("synapse_effects")
    assert len(found) == queries and len(effects) == 3 * queries
    assert (found.n_synapses > 0).all()
    first = json.loads(found.synapses[0])
    assert len(first[0]) == 5 and first == sorted(first, key=lambda s: -s[4])
    suppressed = effects[effects.operation == "suppress"]
    assert (suppressed.n_synapses.to_numpy() == found.n_synapses.to_numpy()).all()
    assert (effects[effects.operation == "none"].dprob == 0).all()
    for name in ("fig6_synapses", "fig11_dkn_distributions", "fig5_heatmap"):
        assert (run / "figures" / f"{name}.svg").exists() and (run / "figures" / f"{name}.png").exists()
    assert set(pd.read_csv(run / "tables" / "table6_cost.csv").operation) == {"none", "suppress", "enhance"}
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and "2 already stored" in again.stdout
