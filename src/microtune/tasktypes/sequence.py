"""Sentence(-pair) classification and regression: one read-out feature per example, a linear
head, cross-entropy or MSE, and `AutoModelForSequenceClassification` where it matches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.tasktypes.base import Outputs, TaskType


class SequenceTaskType(TaskType):
    """What classification and regression share: encoding, and the stock export (BERT with the
    pooler read-out: its classifier reads the same pooled feature)."""

    def readout(self, requested: str | None, default: str) -> str:
        if requested == "tokens":
            raise MicrotuneError(
                "--readout tokens is for token classification; a sentence task needs one "
                "feature per example (mean, first, mask, last, pooler)"
            )
        return requested or default

    def encode(self, tokenizer, examples, max_length, add_mask_token=False):
        from microtune.data import encode

        rows = encode(tokenizer, examples, max_length, add_mask_token)
        return rows, [e.label for e in examples]

    def export_stock(self, task_model, config: dict[str, Any], folder) -> bool:
        from transformers import AutoModelForSequenceClassification

        from microtune.model import backbone_dtype

        backbone, head = task_model.backbone, task_model.head_config
        classifier = task_model.arch.seq_cls_classifier
        if head.readout != "pooler" or not classifier:
            return False
        cls_config = backbone.config.__class__.from_dict(backbone.config.to_dict())
        cls_config.num_labels = head.num_labels
        cls_config.problem_type = (
            "regression" if head.num_labels == 1 else "single_label_classification"
        )
        label_names = config["task"].get("label_names") or []
        if label_names:
            cls_config.id2label = dict(enumerate(label_names))
            cls_config.label2id = {name: i for i, name in enumerate(label_names)}
        # In the base's precision (the head too: a stock model has one dtype).
        full = AutoModelForSequenceClassification.from_config(cls_config).to(
            backbone_dtype(backbone)
        )
        getattr(full, full.base_model_prefix).load_state_dict(backbone.state_dict())
        getattr(full, classifier).load_state_dict(task_model.head.linear.state_dict())
        full.save_pretrained(folder)
        return True


class SequenceClassification(SequenceTaskType):
    """One class per example out of num_labels (≥ 2), cross-entropy; softmax scores."""

    name = "classification"
    stock_format = "sequence-classification"

    def loss(self, logits, labels, reduction="mean"):
        return nn.functional.cross_entropy(logits, labels, reduction=reduction)

    def score(self, task, outputs: Outputs, labels: Sequence):
        from microtune.metrics import compute_metrics

        return compute_metrics(task.metrics, outputs.argmax(-1), labels)

    def present(self, outputs: Outputs, label_names, examples, labels):
        scores, indices = torch.from_numpy(outputs).softmax(-1).max(-1)
        return [
            {"label": label_names[i], "score": float(s)}
            for i, s in zip(indices.tolist(), scores, strict=True)
        ]


class Regression(SequenceTaskType):
    """One number per example (one head output), mean squared error."""

    name = "regression"
    stock_format = "sequence-classification"

    def loss(self, logits, labels, reduction="mean"):
        return nn.functional.mse_loss(
            logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction
        )

    def score(self, task, outputs: Outputs, labels: Sequence):
        from microtune.metrics import compute_metrics

        return compute_metrics(task.metrics, outputs[:, 0], labels)

    def present(self, outputs: Outputs, label_names, examples, labels):
        return [{"label": None, "score": float(value)} for value in outputs[:, 0]]
