"""GLUE metrics on scikit-learn and scipy (`evaluate.load` needs a network)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearman")


def compute_metrics(names: tuple[str, ...], predictions, labels) -> dict[str, float]:
    """Each named metric of predictions against labels (class indices, or floats for STS-B)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    results: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            value = accuracy_score(labels, predictions)
        elif name == "f1":
            value = f1_score(labels, predictions)
        elif name == "matthews_correlation":
            value = matthews_corrcoef(labels, predictions)
        elif name == "pearson":
            value = pearsonr(predictions, labels)[0] if np.std(predictions) > 0 else 0.0
        elif name == "spearman":
            value = spearmanr(predictions, labels)[0] if np.std(predictions) > 0 else 0.0
        else:
            raise ValueError(f"metric '{name}' is unknown; use one of {METRICS}")
        results[name] = float(value)
    return results
