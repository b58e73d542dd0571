"""`export --format onnx` (issue #21): the merged model with its read-out and head in one graph,
run by onnxruntime in a process that never imports microtune (or torch), against the unmerged
task model; int8; and the check that refuses to publish a file that disagrees."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import microtune
from microtune.backbone.load import load_backbone
from microtune.cli import main
from microtune.common.files import EXPORT_FILE
from microtune.errors import MicrotuneError
from microtune.export import merged as export_module
from microtune.export.merged import write_merged
from microtune.export.onnx import ONNX_FILE
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.spec import get_task
from microtune.tasks.types import type_of

from .conftest import REPO

TEXTS = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]

# The deployment: tokenizers + onnxruntime + numpy only. Prints JSON: what it imported, the
# label names in the model's metadata, and the logits of TEXTS (padded by the tokenizer).
STANDALONE = r"""
import json, sys
import numpy as np, onnxruntime
from tokenizers import Tokenizer

folder, pad_id, texts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = Tokenizer.from_file(folder + "/tokenizer.json")
tokenizer.enable_padding(pad_id=pad_id)
encodings = tokenizer.encode_batch(texts)
session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
columns = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
feeds = {
    node.name: np.array([getattr(e, columns[node.name]) for e in encodings], dtype=np.int64)
    for node in session.get_inputs()
}
meta = session.get_modelmeta().custom_metadata_map
print(json.dumps({
    "imported": sorted(m for m in ("microtune", "torch", "transformers") if m in sys.modules),
    "labels": json.loads(meta["labels"]),
    "logits": session.run(["logits"], feeds)[0].tolist(),
}))
"""


def task_model(folder, task: str, readout: str, bias: bool = True):
    """A LoRA task model of `task`'s type, moved off its initial values (eval mode), with the
    tokenizer and the config an artifact would hold."""
    backbone, tokenizer = load_backbone(str(folder))
    spec = get_task(task)
    if not spec.num_labels:  # CoNLL's tags are read from its data: five of them here
        tags = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
        spec = dataclasses.replace(spec, num_labels=len(tags), label_names=tags)
    torch.manual_seed(0)
    model = TaskModel(
        backbone,
        HeadConfig(spec.num_labels, readout, bias=bias),
        build_method("lora", {"rank": 4}),
        task_type=type_of(spec),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    config = {"task": task_record(spec), "method": "lora", "base_model": {"name": str(folder)}}
    return model.eval(), tokenizer, {**config, "max_length": 32}


def standalone(folder, pad_id: int, texts=TEXTS) -> dict:
    """Run the export in a fresh Python that imports onnxruntime, numpy and tokenizers only."""
    done = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(folder), str(pad_id), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


CASES = {
    # name: (model type, task, read-out, head bias)
    "classification": ("bert", "mnli", "mean", True),
    "regression": ("roberta", "stsb", "first", True),
    "token-classification": ("bert", "conll2003", "tokens", True),
    "decoder-last-token": ("llama", "sst2", "last", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runs_without_microtune_and_matches_unmerged(case, tiny_model_dirs, tmp_path):
    model_type, task, readout, bias = CASES[case]
    model, tokenizer, config = task_model(tiny_model_dirs[model_type], task, readout, bias)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        expected = model(**inputs).numpy()
    assert write_merged(model, tokenizer, config, tmp_path, onnx=True) == "onnx"
    assert not (tmp_path / "config.json").exists()  # no stock loader mistakes it for a model
    got = standalone(tmp_path, tokenizer.pad_token_id)
    assert got["imported"] == []
    assert got["labels"] == list(config["task"]["label_names"] or ["LABEL_0"])
    logits = np.array(got["logits"], dtype=np.float32)
    assert logits.shape == expected.shape
    real = inputs["attention_mask"].bool().numpy()  # per token: padding positions are free
    diff = (
        abs(logits - expected)[real] if case == "token-classification" else abs(logits - expected)
    )
    assert diff.max() <= 1e-4 * max(1.0, float(abs(expected).max()))
    record = json.loads((tmp_path / EXPORT_FILE).read_text())
    assert record["format"] == "onnx" and "onnxruntime" in record["loads_with"]


def test_bert_shaped_encoders_export_with_fused_attention(tiny_model_dirs, tmp_path):
    """onnxruntime's transformer optimizer runs inside the export: one fused Attention op per
    layer of a BERT-shaped encoder (the speed of bench/onnx_speed.py), still within 1e-4."""
    model, tokenizer, config = task_model(tiny_model_dirs["bert"], "mnli", "mean")
    layers = model.backbone.config.num_hidden_layers
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).numpy()
    write_merged(model, tokenizer, config, tmp_path, onnx=True)
    ops = [node.op_type for node in onnx.load(str(tmp_path / ONNX_FILE)).graph.node]
    assert ops.count("Attention") == layers and "SkipLayerNormalization" in ops
    assert model.backbone.config._attn_implementation != "eager"  # restored after the export
    logits = np.array(standalone(tmp_path, tokenizer.pad_token_id)["logits"], dtype=np.float32)
    assert abs(logits - expected).max() <= 1e-4 * max(1.0, float(abs(expected).max()))


def test_int8_quantises_the_weights_and_stays_close(tiny_model_dirs, tmp_path):
    model, tokenizer, config = task_model(tiny_model_dirs["bert"], "mnli", "mean")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).numpy()
    write_merged(model, tokenizer, config, tmp_path / "f32", onnx=True)
    write_merged(model, tokenizer, config, tmp_path / "int8", onnx=True, quantize="int8")
    graph = onnx.load(str(tmp_path / "int8" / ONNX_FILE))
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}
    assert {p.key: p.value for p in graph.metadata_props}["quantize"] == "int8"
    assert sorted(p.name for p in (tmp_path / "int8").iterdir() if p.suffix == ".onnx") == [
        ONNX_FILE
    ]  # the float32 graph it was quantised from is gone
    logits = np.array(standalone(tmp_path / "int8", tokenizer.pad_token_id)["logits"])
    assert 0 < abs(logits - expected).max() <= 0.1 * max(1.0, float(abs(expected).max()))


def test_causal_lm_is_refused_in_one_line(tiny_model_dirs, tmp_path):
    from microtune.export.onnx import check_onnx_exportable

    model, _, _ = task_model(tiny_model_dirs["bert"], "mnli", "mean")
    model.task_type = type_of(get_task("causal-lm"))
    with pytest.raises(MicrotuneError, match="--format onnx covers .* not causal-lm"):
        check_onnx_exportable(model, None)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_model_dirs, toy_files):
    """A few real SLaSh steps of the tiny BERT on the toy sentiment files, by the CLI."""
    folder = tmp_path_factory.mktemp("toy-run") / "run"
    code = main(
        [
            "train", "--task", "classification", "--model", str(tiny_model_dirs["bert"]),
            "--train-file", str(toy_files / "train.jsonl"), "--dev-file",
            str(toy_files / "dev.jsonl"), "--text-columns", "sentence", "--label-column",
            "label", "--method", "slash", "--max-steps", "20", "--batch-size", "16",
            "--output", str(folder),
        ]
    )  # fmt: skip
    assert code == 0
    return folder, toy_files / "dev.jsonl"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_onnx_then_predict_model_folder_agrees(tiny_artifact, tmp_path, capsys):
    artifact, dev = tiny_artifact
    for name, extra in (("f32", []), ("int8", ["--quantize", "int8"])):
        code, out, err = run_cli(
            capsys, "export", "--artifact", str(artifact), "--output", str(tmp_path / name),
            "--data-file", str(dev), "--format", "onnx", *extra,
        )  # fmt: skip
        assert code == 0, err
        report = json.loads(out)
        assert report["format"] == "onnx"
        if not extra:
            assert report["max_abs_logit_diff"] <= 1e-4
        else:
            assert report["same_label_share"] >= 0.9
    texts = tmp_path / "texts.txt"
    texts.write_text("the film is good\na dull plot\nlove it , great fun\n")
    runs = {}
    for flag, where in (("--artifact", artifact), ("--model-folder", tmp_path / "f32")):
        code, out, err = run_cli(capsys, "predict", flag, str(where), "--input", str(texts))
        assert code == 0, err
        runs[flag] = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in runs["--artifact"]] == [r["label"] for r in runs["--model-folder"]]
    for a, b in zip(runs["--artifact"], runs["--model-folder"], strict=True):
        assert abs(a["score"] - b["score"]) <= 1e-5


def test_a_disagreeing_onnx_file_is_never_published(tiny_artifact, tmp_path, monkeypatch):
    artifact, dev = tiny_artifact

    def shifted(folder):
        logits, session = real_load(folder)
        return (lambda **inputs: logits(**inputs) + 0.5), session

    real_load = export_module.load_onnx
    monkeypatch.setattr(export_module, "load_onnx", shifted)
    with pytest.raises(MicrotuneError, match="export check failed"):
        export_module.export_and_check(
            artifact, tmp_path / "out", data_file=str(dev), examples=8, onnx=True
        )
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_quantize_without_onnx_is_a_one_line_error(tiny_artifact, tmp_path, capsys):
    artifact, dev = tiny_artifact
    code, _, err = run_cli(
        capsys, "export", "--artifact", str(artifact), "--output", str(tmp_path / "x"),
        "--data-file", str(dev), "--quantize", "int8",
    )  # fmt: skip
    assert code == 2 and "--quantize applies to --format onnx" in err
    assert not (tmp_path / "x").exists()


def test_export_guide_onnx_snippet_runs_without_microtune(tiny_artifact, tmp_path, capsys):
    """The export guide's ONNX lines, in a fresh Python with no microtune or torch, give the labels
    `microtune predict --artifact` gives."""
    artifact, dev = tiny_artifact
    out = tmp_path / "onnx"
    code, _, err = run_cli(
        capsys, "export", "--artifact", str(artifact), "--output", str(out),
        "--data-file", str(dev), "--format", "onnx", "--check-examples", "8",
    )  # fmt: skip
    assert code == 0, err
    readme = (REPO / "docs" / "guides" / "export.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    snippet = re.sub(r'folder = ".*?"', f'folder = "{out}"', snippet)
    texts = ["a gripping , funny film", "dull and lifeless"]
    check = "\nimport sys\nassert 'torch' not in sys.modules and 'microtune' not in sys.modules\n"
    done = subprocess.run(
        [sys.executable, "-c", snippet + check],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    labels = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    expected = [p["label"] for p in microtune.load(artifact).predict(texts)]
    assert labels == expected
