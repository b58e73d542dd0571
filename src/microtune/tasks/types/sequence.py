"""Sentence(-pair) classification and regression: one read-out feature per example, a linear
head, cross-entropy or MSE, and `AutoModelForSequenceClassification` where it computes the same
function: BERT with the pooler read-out, and decoders (GPT-2, GPT-NeoX, OPT, Llama, Mistral,
Qwen2/3, Gemma 1-3, Phi-3) with the last-token read-out and a bias-free head.

Why a decoder's head must be bias-free to export: the stock decoder classes end in a bias-free
`score` linear, and W h + b equals W' h for every h only if some u has u . h = 1 for every
final hidden state h. After an RMSNorm (the Llama family, SmolLM2) no linear function of h is
constant, so the bias cannot be folded. (After a LayerNorm with a bias, as in GPT-2, one is:
sum_i (h_i - beta_i) / gamma_i = 0; folding through it divides by sum_i beta_i / gamma_i, which
can be near zero, so it is not done.) A decoder's sentence head therefore trains without a bias
by default (`default_head_bias`), as those classes' own heads do; with `--head-bias` the
export is backbone + head, with a warning that says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microtune.backbone.load import backbone_dtype
from microtune.errors import MicrotuneError
from microtune.tasks.data import encode
from microtune.tasks.inference import Outputs
from microtune.tasks.metrics import METRICS, compute_metrics, per_class_report
from microtune.tasks.probe import logits_match, probe_batch, task_logits
from microtune.tasks.types.base import TaskType, own_linear, stock_model_like

# Bound on max |stock - task model| logits on the probe batches, relative to the largest
# |logit| (at least 1): the same merged weights, so only the head's rounding differs (a stock
# model computes its head in the base's precision, the task model in float32).
_SAME_FUNCTION_TOLERANCE = {torch.float32: 1e-4}
_HALF_TOLERANCE = 5e-2


class SequenceTaskType(TaskType):
    """What classification and regression share: encoding, the head's bias default and the
    stock `AutoModelForSequenceClassification` export."""

    def readout(self, requested: str | None, default: str) -> str:
        if requested == "tokens":
            raise MicrotuneError(
                "--readout tokens is for token classification; a sentence task needs one "
                "feature per example (mean, first, mask, last, pooler)"
            )
        return requested or default

    def default_head_bias(self, readout: str, causal: bool) -> bool:
        """No bias on a decoder's last-token head, as the stock classes' `score` (module
        docstring): then the merged model exports as that class."""
        return not (causal and readout == "last")

    metrics = METRICS
    stock_format = "sequence-classification"
    stock_class = "AutoModelForSequenceClassification"

    def encode(self, tokenizer, examples, max_length, readout=""):
        rows = encode(tokenizer, examples, max_length, add_mask_token=readout == "mask")
        return rows, [e.label for e in examples]

    def export_stock(self, task_model, config: dict[str, Any], folder) -> bool:
        """`AutoModelForSequenceClassification` for BERT's pooler read-out (its classifier reads
        the pooled feature) and for a decoder's last-token read-out (the stock class reads the
        rightmost token that is not `pad_token_id`, right- or left-padded). Written only when
        its logits match the task model's on probe batches padded both ways, and, for
        decoders, when the exported tokenizer never ends a text with the pad token (pad = EOS
        with EOS appended: the stock class would read the token before it)."""
        from transformers import AutoModelForSequenceClassification

        backbone, head, arch = task_model.backbone, task_model.head_config, task_model.arch
        decoder = head.readout == "last" and arch.causal
        if not (decoder or (head.readout == "pooler" and arch.seq_cls_classifier)):
            return False
        pad_id = backbone.config.pad_token_id
        if decoder and pad_id is None:
            return False  # the stock class could not tell padding from text
        if decoder and _pad_ends_every_text(folder, pad_id):
            warnings.warn(
                f"exported as backbone + head: the tokenizer ends every text with its pad token "
                f"(id {pad_id}), which a stock ...ForSequenceClassification skips",
                stacklevel=2,
            )
            return False
        cls_config = _classifier_config(backbone.config, head.num_labels, pad_id, config)
        try:
            full = AutoModelForSequenceClassification.from_config(cls_config)
            full = stock_model_like(full, task_model, backbone_dtype(backbone))
            getattr(full, full.base_model_prefix).load_state_dict(backbone.state_dict())
        except (ValueError, KeyError, AttributeError, RuntimeError):
            return False  # no such class for the family, or its backbone differs
        classifier = own_linear(full)
        if classifier is None:
            return False
        ours = task_model.head.linear
        if classifier.bias is None and ours.bias is not None and bool(ours.bias.any()):
            warnings.warn(
                f"exported as backbone + head: {type(full).__name__}'s classifier has no bias "
                "and this head has one; train with --no-head-bias to export that class",
                stacklevel=2,
            )
            return False
        with torch.no_grad():
            classifier.weight.copy_(ours.weight)
            if classifier.bias is not None:
                classifier.bias.copy_(ours.bias if ours.bias is not None else 0.0)
        if not same_function(full, task_model, pad_id):
            return False
        full.save_pretrained(folder)
        return True


def _classifier_config(base_config, num_labels: int, pad_id, config: dict[str, Any]):
    """The stock classifier's config: the base's, with the task's labels and problem type."""
    cls_config = base_config.__class__.from_dict(base_config.to_dict())
    cls_config.num_labels = num_labels
    cls_config.pad_token_id = pad_id
    cls_config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    label_names = config["task"].get("label_names") or []
    if label_names:
        cls_config.id2label = dict(enumerate(label_names))
        cls_config.label2id = {name: i for i, name in enumerate(label_names)}
    return cls_config


def _pad_ends_every_text(folder, pad_id: int) -> bool:
    """The exported tokenizer (written before the model) appends the pad token to a text."""
    from transformers import AutoTokenizer

    if not (Path(folder) / "tokenizer_config.json").is_file():
        return False
    ids = AutoTokenizer.from_pretrained(folder)("a")["input_ids"]
    return bool(ids) and ids[-1] == pad_id


@torch.no_grad()
def same_function(full: nn.Module, task_model, pad_id: int | None) -> bool:
    """The stock model's logits match the task model's on probe rows of 6 and 3 tokens
    (none the pad token), right-padded and left-padded with `pad_id`."""
    tolerance = _SAME_FUNCTION_TOLERANCE.get(next(full.parameters()).dtype, _HALF_TOLERANCE)
    for padding in ("right", "left"):
        inputs = probe_batch(task_model, padding, pad_id)
        inputs.pop("token_type_ids", None)  # the stock class's default, as a user calls it
        if not logits_match(full(**inputs).logits, task_logits(task_model, inputs), tolerance):
            return False
    return True


class SequenceClassification(SequenceTaskType):
    """One class per example out of num_labels (≥ 2), cross-entropy; softmax scores."""

    name = "classification"

    def loss(self, logits, labels, reduction="mean"):
        return nn.functional.cross_entropy(logits, labels, reduction=reduction)

    def score(self, task, outputs: Outputs, labels: Sequence):
        return compute_metrics(task.metrics, outputs.argmax(-1), labels)

    def breakdown(self, task, outputs: Outputs, labels: Sequence):
        """Per-class precision, recall, F1 and support, and the confusion matrix."""
        names = task.label_names or [str(i) for i in range(outputs.shape[-1])]
        return per_class_report(outputs.argmax(-1), labels, names)

    def present(self, outputs: Outputs, label_names, examples, labels):
        scores, indices = torch.from_numpy(outputs).softmax(-1).max(-1)
        return [
            {"label": label_names[i], "score": float(s)}
            for i, s in zip(indices.tolist(), scores, strict=True)
        ]

    def check_ranks(self) -> None:
        """Its outputs are one distribution over the labels per input."""

    def rank(self, outputs: Outputs, label_names, k: int):
        probabilities = torch.from_numpy(outputs).softmax(-1)
        scores, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        return [
            [{"label": label_names[i], "score": s} for i, s in zip(row, row_scores, strict=True)]
            for row, row_scores in zip(indices.tolist(), scores.tolist(), strict=True)
        ]


class Regression(SequenceTaskType):
    """One number per example (one head output), mean squared error."""

    name = "regression"

    def loss(self, logits, labels, reduction="mean"):
        return nn.functional.mse_loss(
            logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction
        )

    def score(self, task, outputs: Outputs, labels: Sequence):
        return compute_metrics(task.metrics, outputs[:, 0], labels)

    def present(self, outputs: Outputs, label_names, examples, labels):
        return [{"label": None, "score": float(value)} for value in outputs[:, 0]]
