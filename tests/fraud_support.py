"""Fraud scoring in tests: a model file that always says 0, so each rule shows on its own."""

from __future__ import annotations

import json
from pathlib import Path

from fraud_svc.features import FEATURES


def write_zero_model(path: Path) -> Path:
    """A model (FRAUD_MODEL_PATH) whose probability is 0 for every vote."""
    n = len(FEATURES)
    path.write_text(json.dumps({"version": "zero", "features": list(FEATURES),
                                "mean": [0.0] * n, "scale": [1.0] * n, "weights": [0.0] * n,
                                "bias": -100.0}))
    return path
