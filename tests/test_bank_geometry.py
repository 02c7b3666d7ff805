"""experiments/bank_geometry.py's arithmetic on small matrices (no model)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
spec = importlib.util.spec_from_file_location("bank_geometry", ROOT / "experiments" / "bank_geometry.py")
bank_geometry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bank_geometry)


def test_residuals_that_copy_the_keys_structure_correlate_fully_and_random_ones_do_not():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(40, 12)) + 0.5                       # shared component: cosines vary
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    aligned = bank_geometry.geometry(keys, 3.0 * keys @ q, None)  # rotated and scaled: same cosines
    assert aligned["corr"] == pytest.approx(1.0)
    assert aligned["delta_cos"] == pytest.approx(aligned["key_cos"])
    unrelated = bank_geometry.geometry(keys, rng.normal(size=(40, 12)), None)
    assert abs(unrelated["corr"]) < 0.3
    assert "f_cost" not in unrelated


def test_fisher_cost_is_measured_in_the_metric_scaled_to_mean_eigenvalue_one():
    deltas = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    keys = np.eye(3, 2) + 0.1
    g = bank_geometry.geometry(keys, deltas, np.diag([10.0, 30.0]))   # scaled: diag(0.5, 1.5)
    assert g["f_cost"] == pytest.approx(np.median([0.5, 6.0, 4.5]))
    assert g["norm"] == pytest.approx(2.0)
