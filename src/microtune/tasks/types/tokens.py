"""Token classification (NER): a label per word, read at the word's first sub-token.

Words are tokenised with `is_split_into_words` and aligned through the fast tokenizer's
`word_ids`: the first sub-token of each word carries its label, later sub-tokens and special
tokens carry -100 (not scored, not trained). Metrics are entity-level over BIO spans with
`seqeval` (conlleval's rules), on the words that survive truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from microtune.backbone.load import backbone_dtype
from microtune.errors import MicrotuneError
from microtune.tasks.data import IGNORE_INDEX
from microtune.tasks.inference import Outputs
from microtune.tasks.probe import logits_match, probe_batch, task_logits
from microtune.tasks.spec import Example
from microtune.tasks.types.base import TaskType, own_linear, stock_model_like


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per-token labels: a word's label at its first sub-token, -100 everywhere else."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(IGNORE_INDEX if word is None or word == previous else word_labels[word])
        previous = word
    return aligned


def encode_words(
    tokenizer: Any, examples: Sequence, max_length: int
) -> tuple[list[dict[str, list[int]]], list[list[int]]]:
    """Token rows and aligned labels of examples whose `texts` are words, `label` word tags."""
    if not getattr(tokenizer, "is_fast", False):
        raise MicrotuneError(
            "token classification needs a fast tokenizer (for word_ids); this model's is not"
        )
    try:
        batch = tokenizer(
            [list(e.texts) for e in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            return_attention_mask=True,
        )
    except (ValueError, TypeError) as error:  # e.g. byte-level BPE without add_prefix_space
        raise MicrotuneError(
            f"this tokenizer cannot take pre-split words: {str(error).splitlines()[0]}"
        ) from None
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    rows = [{k: list(batch[k][i]) for k in keys} for i in range(len(examples))]
    labels = [align_labels(batch.word_ids(i), e.label) for i, e in enumerate(examples)]
    return rows, labels


class TokenClassification(TaskType):
    """One of num_labels tags per word; the head is applied to every token's hidden state."""

    name = "token-classification"
    per_token = True
    # Entity-level scores over BIO spans (seqeval); per-type F1 comes as f1_<TYPE> beside them.
    metrics = ("f1", "precision", "recall")
    stock_format = "token-classification"
    stock_class = "AutoModelForTokenClassification"

    def read_example(self, task, row, columns, label_column, where):
        words, tags = row[columns[0]], row[label_column]
        if len(columns) != 1:
            raise MicrotuneError(f"token classification reads one column of words, not {columns}")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise MicrotuneError(f"{where}: column '{columns[0]}' must be a list of words")
        if not isinstance(tags, list) or len(tags) != len(words):
            raise MicrotuneError(
                f"{where}: column '{label_column}' must be a list of one tag per word "
                f"({len(words)} words)"
            )
        indices = []
        for tag in tags:
            if not isinstance(tag, str) or tag not in task.label_names:
                raise MicrotuneError(
                    f"{where}: tag {tag!r} is not one of the training tags "
                    f"{', '.join(task.label_names)}; tags are strings such as B-PER"
                )
            indices.append(task.label_names.index(tag))
        return Example(tuple(words), tuple(indices))

    def seen_labels(self, rows, column, source):
        seen: set[str] = set()
        for number, row in enumerate(rows, 1):
            tags = row.get(column)
            if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
                raise MicrotuneError(
                    f"{source}, row {number}: column '{column}' must be a list of string tags "
                    "(BIO, such as B-PER)"
                )
            seen.update(tags)
        return seen

    def order_labels(self, seen):
        """ "O" first, then the other tags sorted."""
        return ["O", *sorted(seen - {"O"})] if "O" in seen else sorted(seen)

    def readout(self, requested: str | None, default: str) -> str:
        if requested not in (None, "tokens"):
            raise MicrotuneError(
                f"--readout {requested}: token classification reads every token; leave it out"
            )
        return "tokens"

    def encode(self, tokenizer, examples, max_length, readout=""):
        return encode_words(tokenizer, examples, max_length)

    def loss(self, logits, labels, reduction="mean"):
        flat = nn.functional.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)
        scored = (labels != IGNORE_INDEX).to(flat.dtype)
        if reduction == "none":  # each example's mean over its labelled tokens
            return flat.sum(-1) / scored.sum(-1).clamp_min(1.0)
        return flat.sum() / scored.sum().clamp_min(1.0)

    def loss_units(self, labels: torch.Tensor) -> int:
        """The labelled tokens: what `loss` averages over."""
        return int((labels != IGNORE_INDEX).sum())

    def tags(self, outputs: Outputs, labels: Sequence, names: Sequence[str]):
        """(gold, predicted) tag lists per example, read at the labelled (first) sub-tokens."""
        gold, predicted = [], []
        for logits, row in zip(outputs, labels, strict=True):
            row = np.asarray(row[: len(logits)])
            where = row != IGNORE_INDEX
            gold.append([names[i] for i in row[where]])
            predicted.append([names[i] for i in logits[: len(row)][where].argmax(-1)])
        return gold, predicted

    def score(self, task, outputs: Outputs, labels: Sequence):
        from seqeval.metrics import classification_report

        gold, predicted = self.tags(outputs, labels, task.label_names)
        report = classification_report(gold, predicted, output_dict=True, zero_division=0)
        micro = report["micro avg"]
        results = {
            key: float(micro[f"{key}-score" if key == "f1" else key]) for key in task.metrics
        }
        for kind, values in report.items():
            if not kind.endswith(" avg"):
                results[f"f1_{kind}"] = float(values["f1-score"])
        return results

    def present(self, outputs: Outputs, label_names, examples, labels):
        records = []
        for logits, row, example in zip(outputs, labels, examples, strict=True):
            row = np.asarray(row[: len(logits)])
            positions = np.flatnonzero(row != IGNORE_INDEX)
            probabilities = torch.from_numpy(logits[positions]).softmax(-1)
            scores, indices = probabilities.max(-1) if len(positions) else ([], [])
            tags = [label_names[i] for i in indices.tolist()] if len(positions) else []
            # Words cut off by --max-length have no tag.
            missing = len(example.texts) - len(tags)
            records.append(
                {
                    "tokens": list(example.texts),
                    "tags": tags + [None] * missing,
                    "scores": [round(float(s), 6) for s in scores] + [None] * missing,
                }
            )
        return records

    def export_stock(self, task_model, config: dict[str, Any], folder) -> bool:
        """`AutoModelForTokenClassification` where its head is dropout + one linear on the last
        hidden state (checked numerically here, so a family whose class adds layers falls back
        to backbone + head)."""
        from transformers import AutoModelForTokenClassification

        backbone, head = task_model.backbone, task_model.head_config
        cls_config = backbone.config.__class__.from_dict(backbone.config.to_dict())
        cls_config.num_labels = head.num_labels
        names = config["task"].get("label_names") or []
        if names:
            cls_config.id2label = dict(enumerate(names))
            cls_config.label2id = {name: i for i, name in enumerate(names)}
        try:
            full = AutoModelForTokenClassification.from_config(cls_config)
        except (ValueError, KeyError):  # the family has no token-classification class
            return False
        full = stock_model_like(full, task_model, backbone_dtype(backbone))
        base = getattr(full, full.base_model_prefix, None)
        if base is None:
            return False
        result = base.load_state_dict(backbone.state_dict(), strict=False)
        if result.missing_keys or any(not k.startswith("pooler.") for k in result.unexpected_keys):
            return False
        classifier = own_linear(full)
        if classifier is None:
            return False
        classifier.load_state_dict(task_model.head.linear.state_dict())
        if not _same_function(full, task_model):
            return False
        full.save_pretrained(folder)
        return True


@torch.no_grad()
def _same_function(full: nn.Module, task_model) -> bool:
    """The stock model's logits match the task model's on a short probe batch."""
    inputs = probe_batch(task_model, "none")
    inputs.pop("token_type_ids", None)  # the stock class's default, as a user calls it
    return logits_match(full(**inputs).logits, task_logits(task_model, inputs), 1e-3)
