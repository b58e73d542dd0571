"""sentence-transformers export: a mean- (or first-token-) pooled sentence task as a
`sentence-transformers` folder whose `encode` returns the task's logits.

No stock `transformers` task class pools by the mean, so this read-out (the default for
encoders: the packaged MiniLM is a sentence-transformers model) is exported as the modules
that library chains: Transformer (the merged backbone), Pooling(mean | cls) and the head as a
final Dense with an identity activation.

from sentence_transformers import SentenceTransformer
model = SentenceTransformer("runs/sst2-merged")
logits = model.encode(["a gripping , funny film"])  # (1, num_labels); label names: README

The Transformer module sits in `0_Transformer/`, not in the folder's root, so that the root
holds no `config.json`: a stock loader (`pipeline("text-classification", model=...)`) then
fails loudly instead of building a classifier with a random head over the backbone.
sentence-transformers keeps no label names for an embedding model; the export's record
(`microtune_export.json`, "task"."label_names") and its README.md hold them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from microtune.errors import MicrotuneError
from microtune.tasks.probe import logits_match, probe_batch, task_logits

ST_FORMAT = "sentence-transformers"
TRANSFORMER_FOLDER = "0_Transformer"
# Our read-outs that sentence-transformers' Pooling computes as we do.
POOLING_MODES = {"mean": "mean", "first": "cls"}
_SENTENCE_TYPES = ("classification", "regression")
# Bound on max |ST - task model| logits on the probe rows, relative to the largest |logit|
# (at least 1): the same weights, summed in another order.
_TOLERANCE = 1e-4


def sentence_transformers_fits(task_model) -> bool:
    """A sentence task whose read-out Pooling computes, on a float32 base (sentence-transformers
    loads its Transformer in float32)."""
    return (
        task_model.task_type.name in _SENTENCE_TYPES
        and task_model.head_config.readout in POOLING_MODES
        and next(task_model.backbone.parameters()).dtype == torch.float32
    )


def write_sentence_transformer(
    task_model, tokenizer, max_length: int, folder: str | os.PathLike, card: str
) -> None:
    """Write the merged task model into `folder` as a sentence-transformers folder (module
    docstring), checking its logits on probe rows (its Transformer is read back from disk)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    folder = Path(folder)
    inner = folder / TRANSFORMER_FOLDER
    inner.mkdir(exist_ok=True)
    task_model.backbone.save_pretrained(inner)
    tokenizer.save_pretrained(inner)
    transformer = Transformer(str(inner), max_seq_length=max_length)
    transformer.save_in_root = False  # keeps config.json out of the root (module docstring)
    linear = task_model.head.linear
    width = task_model.backbone.config.hidden_size
    pooling = Pooling(width, pooling_mode=POOLING_MODES[task_model.head_config.readout])
    # activation_function=None is the identity: the Dense's outputs are the logits.
    dense = Dense(
        width, linear.out_features, bias=linear.bias is not None, activation_function=None
    )
    dense.linear.load_state_dict(linear.state_dict())
    model = SentenceTransformer(modules=[transformer, pooling, dense], device="cpu")
    _check_probe(model, task_model)
    model.save(str(folder), create_model_card=False)
    (folder / "README.md").write_text(card, encoding="utf-8")


@torch.no_grad()
def _check_probe(model, task_model) -> None:
    """The reloaded folder's logits match the task model's on two right-padded probe rows."""
    inputs = probe_batch(task_model)
    expected = task_logits(task_model, inputs)
    got = model.eval()(dict(inputs))["sentence_embedding"]
    if not logits_match(got, expected, _TOLERANCE):
        raise MicrotuneError(
            "sentence-transformers export check failed: its logits differ from the task "
            "model's on probe rows; export with --format onnx, or report this"
        )


def load_sentence_transformer(folder: str | os.PathLike):
    """The folder as sentence-transformers loads it; returns a function inputs (token
    tensors) -> logits, and the model."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu").eval()

    def logits(**inputs: torch.Tensor) -> torch.Tensor:
        return model(dict(inputs))["sentence_embedding"]

    return logits, model
