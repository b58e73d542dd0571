"""Sentence-level metrics on scikit-learn and scipy (`evaluate.load` needs a network)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
)

from microtune.errors import MicrotuneError

METRICS = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman")


class UndefinedMetricWarning(UserWarning):
    """A metric has no value on this split (e.g. a correlation with constant labels)."""


def compute_metrics(names: tuple[str, ...], predictions, labels) -> dict[str, float | None]:
    """Each named metric of predictions against labels (class indices, or floats for STS-B).

    A constant prediction scores 0.0 on the correlations (it captures no relation). A metric
    that is still undefined (not finite: a correlation against constant labels) is recorded as
    None, written `null` in the strict JSON of metrics files, with an `UndefinedMetricWarning`;
    it is never NaN.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if not (np.isfinite(predictions).all() and np.isfinite(labels).all()):
        raise MicrotuneError("predictions and labels must be finite to be scored")
    results: dict[str, float | None] = {}
    for name in names:
        if name == "accuracy":
            value = accuracy_score(labels, predictions)
        elif name == "f1":
            value = f1_score(labels, predictions)
        elif name == "macro_f1":  # any number of classes: the mean of per-class F1
            value = f1_score(labels, predictions, average="macro")
        elif name == "matthews_correlation":
            value = matthews_corrcoef(labels, predictions)
        elif name in ("pearson", "spearman"):
            correlation = pearsonr if name == "pearson" else spearmanr
            if np.std(predictions) > 0:
                with warnings.catch_warnings():  # scipy's warning is replaced by ours below
                    warnings.simplefilter("ignore")
                    value = correlation(predictions, labels)[0]
            else:
                value = 0.0
        else:
            raise ValueError(f"metric '{name}' is unknown; use one of {METRICS}")
        value = float(value)
        if not math.isfinite(value):
            warnings.warn(
                f"{name} is undefined on these {len(labels)} examples (constant labels?); "
                "recorded as null",
                UndefinedMetricWarning,
                stacklevel=2,
            )
            results[name] = None
        else:
            results[name] = value
    return results


def per_class_report(predictions, labels, label_names: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support of every class, by name (as scikit-learn's
    `classification_report`; 0.0 where a class is never predicted or never true), and the
    confusion matrix: `matrix[i][j]` counts examples of class `label_names[i]` predicted as
    `label_names[j]`."""
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    matrix = confusion_matrix(labels, predictions, labels=classes)
    return {
        "per_class": per_class,
        "confusion_matrix": {"labels": list(label_names), "matrix": matrix.tolist()},
    }
