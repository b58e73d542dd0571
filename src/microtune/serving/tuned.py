"""Serving a trained artifact from Python: `microtune.load` and the model it returns.

import microtune

model = microtune.load("runs/sst2")
model.predict(["a gripping film", "dull"])  # [{"label": "positive", "score": ...}, ...]
# token classification: words (a text is split on whitespace) -> {"tokens", "tags", "scores"}
model.merge()                              # fold into the base weights: same outputs
model.save_pretrained("runs/sst2-merged")  # the standard export folder (`microtune merge`)
# causal-lm: model.generate(["Q: 2+2?\nA:"])  # [{"prompt": ..., "response": ...}], greedy
exported = microtune.load("runs/sst2-onnx")  # an export folder runs as written (any format)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtune.artifacts import folders
from microtune.artifacts.store import load_artifact
from microtune.backbone.load import resolve_device
from microtune.common.files import CONFIG_FILE, EXPORT_FILE
from microtune.errors import MicrotuneError
from microtune.export.merged import export_merged, load_exported, read_export_record
from microtune.methods import method_class
from microtune.model import TaskModel
from microtune.tasks.inference import predict, predict_with
from microtune.tasks.spec import Example
from microtune.tasks.types import task_type_of

# One input: a text, a tuple of texts (sentence pairs), or a mapping with the task's columns.
Input = str | Sequence[str] | Mapping[str, str]


class TunedModel:
    """A base model with a trained artifact applied, ready for inference.

    Attributes:
        task_model: the `TaskModel` (backbone, method, read-out, head), in eval mode.
        tokenizer: the base model's tokenizer.
        config: the artifact's `microtune.json` (method, head, task record, base model).
        artifact_dir: where the artifact was loaded from (`save_pretrained` never writes there).
    """

    def __init__(
        self,
        task_model: TaskModel,
        tokenizer,
        config: dict[str, Any],
        artifact_dir: str | os.PathLike | None = None,
    ):
        self.task_model = task_model
        self.tokenizer = tokenizer
        self.config = config
        self.artifact_dir = artifact_dir

    def __repr__(self) -> str:
        return (
            f"TunedModel(method={self.config['method']!r}, task={self.config['task']['name']!r}, "
            f"base_model={self.config['base_model']['name']!r}, merged={self.merged})"
        )

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The task's text columns: one for single sentences, two for sentence pairs."""
        return tuple(self.config["task"]["text_columns"])

    @property
    def task_type(self):
        """The task type: what `predict` presents, how inputs are encoded."""
        return self.task_model.task_type

    @property
    def label_names(self) -> list[str]:
        """Class names from the task record, else LABEL_0, LABEL_1, ... (as transformers)."""
        count = self._num_labels()
        names = self.config["task"].get("label_names") or []
        return list(names) if len(names) == count else [f"LABEL_{i}" for i in range(count)]

    def _num_labels(self) -> int:
        return self.task_model.head_config.num_labels

    def _readout(self) -> str:
        return self.task_model.head_config.readout

    def _run(self, rows: list, batch_size: int):
        """Outputs of encoded rows, as `inference.predict` returns them."""
        return predict(self.task_model, rows, self.tokenizer.pad_token_id, batch_size)

    @property
    def is_regression(self) -> bool:
        return self.task_type.name == "regression"

    @property
    def per_token(self) -> bool:
        """Token classification: one tag per word."""
        return self.task_type.per_token

    @property
    def merged(self) -> bool:
        """True once the method is folded into the backbone's weights (or there is none)."""
        return self.task_model.method is None

    def logits(
        self, inputs: Input | Iterable[Input], batch_size: int = 64
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits (N, num_labels) of the inputs, in order, on the CPU; for token
        classification one (tokens, num_labels) tensor per input.

        Args:
            inputs: a text, a pair of texts, a mapping with the task's text columns, or a
                list of those; pair tasks need two texts per input. For token classification
                an input is a list of words, a text (split on whitespace), or {"tokens": [...]}.
            batch_size: inputs per forward pass.
        """
        outputs, _, _ = self._outputs(inputs, batch_size)
        if isinstance(outputs, list):
            return [torch.from_numpy(o) for o in outputs]
        return torch.from_numpy(outputs)

    def predict(
        self, inputs: Input | Iterable[Input], batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """One record per input, by the task type: {"label", "score"} with the most probable
        label name and its softmax probability; for regression (STS-B) the label is None and
        the score the prediction; for token classification {"tokens", "tags", "scores"}, one
        tag per word (None for words cut off by the artifact's max_length)."""
        outputs, examples, labels = self._outputs(inputs, batch_size)
        return self.task_type.present(outputs, self.label_names, examples, labels)

    def _outputs(self, inputs: Input | Iterable[Input], batch_size: int):
        """(outputs as `inference.predict` returns them, examples, encoded placeholder
        labels)."""
        self.task_type.check_predicts()  # a causal LM generates instead
        examples = self._examples(inputs)
        if not examples:
            width = self._num_labels()
            return ([] if self.per_token else np.empty((0, width), np.float32)), [], []
        max_length, readout = self.config["max_length"], self._readout()
        rows, labels = self.task_type.encode(self.tokenizer, examples, max_length, readout)
        return self._run(rows, batch_size), examples, labels

    def generate(
        self, prompts: str | Iterable[str], max_new_tokens: int = 64, batch_size: int = 16
    ) -> list[dict[str, Any]]:
        """Greedy continuations of a causal-lm artifact, one {"prompt", "response"} per prompt:
        the prompt encoded as in training (with the tokenizer's special tokens, cut to the
        artifact's max_length), then up to `max_new_tokens` tokens until EOS. Merged or not,
        the tokens are the same (`microtune.tasks.types.causal.greedy_generate`)."""
        self.task_model.task_type.check_generates()
        if max_new_tokens < 1 or batch_size < 1:
            raise MicrotuneError("--max-new-tokens and --batch-size must be at least 1")
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in items):
            raise MicrotuneError("generate takes prompts as texts")
        if not items:
            return []
        return self.task_model.task_type.generate(
            self.task_model,
            self.tokenizer,
            items,
            max_new_tokens,
            batch_size,
            self.config["max_length"],
        )

    def merge(self) -> TunedModel:
        """Fold the method into the backbone's weights, in place: the same outputs (to float
        rounding) at the base model's speed. Refuses methods that cannot merge."""
        method_class(self.config["method"]).require_mergeable()
        self.task_model.merge()
        return self

    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> str:
        """Merge (in place) and write the standard export folder, as `microtune merge` does;
        returns its format ("sequence-classification", "sentence-transformers", ...).

        As `microtune merge`: the base model's and the artifact's folders are refused, and a
        folder that is not empty is replaced only with `overwrite`, and only when
        microtune exported it."""
        protected = folders.export_protected(self.config, self.artifact_dir)
        folders.check_model_folder(folder, overwrite=overwrite, protected=protected)
        self.merge()  # after the check: a refused folder leaves the model unmerged
        return export_merged(
            self.task_model,
            self.tokenizer,
            self.config,
            folder,
            overwrite=overwrite,
            protected=protected,
        )

    def examples(self, inputs: Input | Iterable[Input]) -> list[Example]:
        """The inputs as the task's examples, checked (one-line errors): what `predict` encodes;
        the multi-task engine (`microtune.serving.multitask`) reads each request so."""
        return self._examples(inputs)

    def _examples(self, inputs: Input | Iterable[Input]) -> list[Example]:
        if self.per_token:
            return self._word_examples(inputs)
        items = [inputs] if isinstance(inputs, (str, Mapping)) else list(inputs)
        columns = self.text_columns
        examples = []
        for index, item in enumerate(items):
            if isinstance(item, Mapping):
                missing = [c for c in columns if c not in item]
                if missing:
                    raise MicrotuneError(
                        f"input {index} has no '{missing[0]}'; give the task's text columns "
                        f"{', '.join(columns)}"
                    )
                texts = tuple(item[c] for c in columns)
            else:
                # Anything but a list or tuple (a number, None) is one wrong text, refused below.
                texts = tuple(item) if isinstance(item, (list, tuple)) else (item,)
            if len(texts) != len(columns) or not all(isinstance(t, str) for t in texts):
                shown = json.dumps(texts, default=str)[:60]
                raise MicrotuneError(
                    f"input {index} is {shown}; task {self.config['task']['name']} takes "
                    f"{len(columns)} text(s) per input ({', '.join(columns)}): give "
                    + ("texts" if len(columns) == 1 else "pairs (a, b) or dicts with those keys")
                )
            examples.append(Example(texts, 0))
        return examples

    def _word_examples(self, inputs) -> list[Example]:
        """Token classification: each input is a list of words, a text split on whitespace,
        or a mapping with the task's words column (a list of texts is several inputs, as for
        sentence tasks; one list of words goes in a list: [words])."""
        items = [inputs] if isinstance(inputs, (str, Mapping)) else list(inputs)
        column = self.text_columns[0]
        examples = []
        for index, item in enumerate(items):
            if isinstance(item, Mapping):
                item = item.get(column, item.get("tokens"))
            words = item.split() if isinstance(item, str) else item
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                raise MicrotuneError(
                    f"input {index}: token classification takes a list of words, a text, or "
                    f'{{"{column}": [...]}}'
                )
            examples.append(Example(tuple(words), tuple(0 for _ in words)))
        return examples


class ExportedModel(TunedModel):
    """An export folder (`microtune export` / `merge`) run as it was written, by the library
    that loads its format (its stock `transformers` class, sentence-transformers,
    onnxruntime, or backbone + head): `predict` and `logits` as a `TunedModel`'s, so a user
    can check an export against the artifact without writing code."""

    def __init__(self, folder: str | os.PathLike, base_model: str | None = None):
        from transformers import AutoTokenizer

        self.record = read_export_record(folder)
        self._type = task_type_of(self.record["task"])
        self.forward, self.runtime = load_exported(folder, base_model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # Exports before the record kept max_length: the tokenizer's, at most 512.
        max_length = self.record.get("max_length") or min(tokenizer.model_max_length, 512)
        config = {**self.record, "max_length": max_length}
        super().__init__(None, tokenizer, config, folder)

    def __repr__(self) -> str:
        return (
            f"ExportedModel(format={self.record['format']!r}, "
            f"task={self.config['task']['name']!r}, folder={str(self.artifact_dir)!r})"
        )

    @property
    def task_type(self):
        return self._type

    @property
    def merged(self) -> bool:
        return True

    def _num_labels(self) -> int:
        return int(self.record["num_labels"])

    def _readout(self) -> str:
        return self.record["readout"]

    def _run(self, rows: list, batch_size: int):
        return predict_with(self.forward, rows, self.tokenizer.pad_token_id, batch_size)

    def generate(self, prompts, max_new_tokens: int = 64, batch_size: int = 16):
        raise MicrotuneError(
            "generate runs an artifact (microtune generate --artifact); a causal-lm export is "
            "a stock AutoModelForCausalLM: generate with transformers"
        )

    def merge(self) -> TunedModel:
        return self  # an export is merged

    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> str:
        raise MicrotuneError(
            f"{self.artifact_dir} is already an export; copy the folder, or export the artifact"
        )


def is_export_folder(path: str | os.PathLike) -> bool:
    """A folder `microtune export` / `merge` wrote (an export record, no artifact)."""
    folder = Path(path)
    return (folder / EXPORT_FILE).is_file() and not (folder / CONFIG_FILE).is_file()


def load(artifact: str | os.PathLike, model: str | None = None, device: str = "cpu") -> TunedModel:
    """Load a trained artifact, or an export folder, for inference.

    Args:
        artifact: the folder `microtune train --output` wrote, or a hub repo id holding one,
            `owner/name` or `owner/name@revision` (fetched into the hub cache; offline, served
            from the cache if fetched before). A local folder is never sent to the hub.
        model: the base model, if not where the artifact says; its weights must match the
            fingerprint the artifact stores.
        device: where to run: cpu, cuda, cuda:1, or auto (the GPU if there is one).

    Returns:
        A `TunedModel` with `predict`, `logits`, `merge` and `save_pretrained` (`generate` for
        a causal-lm artifact); for an export folder an `ExportedModel` (`predict`, `logits`),
        on the CPU, run by the library its format names (`model`: a peft export's base).
    """
    if is_export_folder(artifact):
        return ExportedModel(artifact, model)
    task_model, tokenizer, config = load_artifact(artifact, model)  # a hub id: fetched there
    task_model.to(resolve_device(device))
    return TunedModel(task_model, tokenizer, config, artifact)


def parse_input_lines(lines: Iterable[str]) -> list[Input]:
    """Inputs from text lines (the CLI's file or stdin): a JSON object line is a mapping of
    columns (pair tasks), any other non-empty line is one text."""
    inputs: list[Input] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                inputs.append(record)
                continue
        inputs.append(line)
    return inputs


__all__ = ["ExportedModel", "TunedModel", "is_export_folder", "load", "parse_input_lines"]
