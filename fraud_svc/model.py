"""The fraud model: logistic regression over FEATURES, trained by fraud_svc/train.py.

The model file (JSON, versioned in fraud_svc/model/) carries the standardization and the
weights; inference is a pure-Python dot product, a couple of microseconds per vote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from operator import mul
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "model" / "v1.json"


@dataclass(frozen=True)
class Model:
    version: str
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    @classmethod
    def load(cls, path: str | Path = "") -> Model:
        data = json.loads(Path(path or DEFAULT_PATH).read_text())
        return cls(str(data["version"]), tuple(data["features"]),
                   tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["scale"]),
                   tuple(float(v) for v in data["weights"]), float(data["bias"]))

    def __post_init__(self) -> None:
        # Standardization folded into the weights once, so inference is one dot product.
        folded = tuple(w / s for w, s in zip(self.weights, self.scale, strict=True))
        object.__setattr__(self, "_folded", folded)
        object.__setattr__(self, "_intercept", self.bias - sum(
            f * m for f, m in zip(folded, self.mean, strict=True)))

    def predict(self, inputs: list[float]) -> float:
        """The probability that the vote is fraudulent."""
        folded: tuple[float, ...] = self._folded  # type: ignore[attr-defined]
        if len(inputs) != len(folded):
            raise ValueError(f"{len(inputs)} inputs for a model of {len(folded)} features")
        # sum() over map(): the dot product at C speed (in the order of a loop; from Python
        # 3.12 sum() also compensates rounding, which can move the last bit).
        z: float = sum(map(mul, inputs, folded), self._intercept)  # type: ignore[attr-defined]
        if z < -30:
            return 0.0
        return 1.0 / (1.0 + math.exp(-z))
