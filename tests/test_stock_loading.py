"""No export loads silently wrong (issue #21): each folder `merge` / `export` writes loads in the
library its record names with the unmerged model's outputs, or makes every stock loader fail
loudly; `microtune.load` / `predict --model-folder` run each of them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForSequenceClassification, pipeline

import microtune
from microtune.artifacts.store import save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.common.files import EXPORT_FILE
from microtune.export.merged import BACKBONE_FOLDER, write_merged
from microtune.export.peft import export_peft
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.serving.tuned import ExportedModel
from microtune.tasks.examples import task_record
from microtune.tasks.spec import get_task

TEXTS = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]


def lora_model(folder, task: str, readout: str, bias: bool = True):
    """A LoRA task model moved off its initial values (eval mode), its tokenizer, the config an
    artifact would hold, and its logits on TEXTS."""
    backbone, tokenizer = load_backbone(str(folder))
    spec = get_task(task)
    if task == "classification":  # the user's own labels, three of them
        spec = dataclasses.replace(spec, num_labels=3, label_names=("neg", "neutral", "pos"))
    torch.manual_seed(0)
    model = TaskModel(
        backbone,
        HeadConfig(spec.num_labels, readout, bias=bias),
        build_method("lora", {"rank": 4}),
        mask_token_id=tokenizer.mask_token_id,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        expected = model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    config = {"task": task_record(spec), "method": "lora", "base_model": {"name": str(folder)}}
    return model, tokenizer, {**config, "max_length": 32}, expected


def refuses_stock_loaders(folder) -> None:
    """`pipeline()` and the Auto class raise instead of building a random head."""
    with pytest.raises((OSError, ValueError, KeyError)):
        pipeline("text-classification", model=str(folder))
    with pytest.raises((OSError, ValueError, KeyError)):
        AutoModelForSequenceClassification.from_pretrained(folder)


def predicts_like(folder, expected: torch.Tensor, names) -> None:
    """`microtune.load` on the export folder: the same logits and label names."""
    exported = microtune.load(folder)
    assert isinstance(exported, ExportedModel)
    assert (exported.logits(TEXTS) - expected).abs().max() <= 1e-4
    labels = [p["label"] for p in exported.predict(TEXTS)]
    assert labels == [names[i] for i in expected.argmax(-1).tolist()]


def test_mean_pooling_exports_for_sentence_transformers(tiny_model_dirs, tmp_path):
    model, tokenizer, config, expected = lora_model(
        tiny_model_dirs["bert"], "classification", "mean"
    )
    assert write_merged(model, tokenizer, config, tmp_path) == "sentence-transformers"
    logits = SentenceTransformer(str(tmp_path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (logits - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    names = ["neg", "neutral", "pos"]
    assert ", ".join(names) in (tmp_path / "README.md").read_text()
    record = json.loads((tmp_path / EXPORT_FILE).read_text())
    assert "SentenceTransformer" in record["loads_with"]
    assert not (tmp_path / "config.json").exists()
    refuses_stock_loaders(tmp_path)
    predicts_like(tmp_path, expected, names)


def test_backbone_and_head_fails_loudly_in_stock_loaders(tiny_model_dirs, tmp_path):
    """A decoder's last token under a head with a bias: no stock class, no sentence-transformers
    route; the folder root holds no config.json."""
    model, tokenizer, config, expected = lora_model(tiny_model_dirs["llama"], "sst2", "last")
    with pytest.warns(UserWarning, match="has no bias and this head has one"):
        assert write_merged(model, tokenizer, config, tmp_path) == "backbone+head"
    assert (tmp_path / BACKBONE_FOLDER / "config.json").is_file()
    refuses_stock_loaders(tmp_path)
    predicts_like(tmp_path, expected, ["negative", "positive"])
    # An export from before the backbone moved into backbone/ still runs (such an export
    # predates the record's file hashes too).
    for path in (tmp_path / BACKBONE_FOLDER).iterdir():
        shutil.move(path, tmp_path / path.name)
    (tmp_path / BACKBONE_FOLDER).rmdir()
    record = json.loads((tmp_path / EXPORT_FILE).read_text())
    old = {k: v for k, v in record.items() if k not in ("files", "record_sha256")}
    (tmp_path / EXPORT_FILE).write_text(json.dumps(old))
    predicts_like(tmp_path, expected, ["negative", "positive"])


def test_stock_class_loads_in_pipeline_with_predict_labels(tiny_model_dirs, tmp_path):
    model, tokenizer, config, expected = lora_model(tiny_model_dirs["bert"], "sst2", "pooler")
    assert write_merged(model, tokenizer, config, tmp_path) == "sequence-classification"
    classify = pipeline("text-classification", model=str(tmp_path))
    ours = microtune.load(tmp_path).predict(TEXTS)
    theirs = classify(TEXTS)
    assert [p["label"] for p in theirs] == [p["label"] for p in ours]
    assert {p["label"] for p in theirs} <= {"negative", "positive"}
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs, strict=True)) <= 1e-5
    predicts_like(tmp_path, expected, ["negative", "positive"])


def test_peft_export_fails_loudly_in_stock_loaders(tiny_model_dirs, tmp_path):
    """peft's format names no base model, so transformers cannot put a random head under the
    adapter; peft over the base (`microtune.load`) gives the artifact's outputs."""
    model, tokenizer, config, expected = lora_model(tiny_model_dirs["bert"], "sst2", "mean")
    save_artifact(
        tmp_path / "run",
        model,
        method_name="lora",
        base_model=str(tiny_model_dirs["bert"]),
        base_fingerprint=fingerprint(load_backbone(str(tiny_model_dirs["bert"]))[0]),
        task=config["task"],
        max_length=32,
    )
    export_peft(tmp_path / "run", tmp_path / "peft")
    refuses_stock_loaders(tmp_path / "peft")
    predicts_like(tmp_path / "peft", expected, ["negative", "positive"])
