"""Decoders for sentence classification (issue #9, item 5): the last-token read-out (right- or
left-padded), a bias-free head by default, and the export as the stock
`...ForSequenceClassification` class, whose logits equal the unmerged model's."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from microtune.api import load_exported
from microtune.artifacts.store import load_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import load_backbone
from microtune.cli import main
from microtune.common.files import CONFIG_FILE, TENSORS_FILE
from microtune.export.merged import write_merged
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.privacy.per_example import PerExampleGradients, loop_gradients
from microtune.tasks.data import batches
from microtune.tasks.examples import task_record
from microtune.tasks.heads import read_out
from microtune.tasks.spec import get_task

from .conftest import FAMILY_TYPES, decoder_tokenizer, make_tiny_model

TEXTS = ["the film is good", "a very dull plot , not fun", "love it"]
DECODERS = tuple(t for t in FAMILY_TYPES if arch_for(t).causal)


def decoder_model(folder, bias: bool = False):
    """A LoRA task model with the last-token read-out and three labels, moved off its initial
    values, in eval mode."""
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)
    method = build_method("lora", {"rank": 4})
    model = TaskModel(backbone, HeadConfig(3, "last", bias=bias), method)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval(), tokenizer


def padded(tokenizer, side: str) -> dict[str, torch.Tensor]:
    """TEXTS padded on `side` by the tokenizer itself, as a deployment would call it."""
    tokenizer.padding_side = side
    try:
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def unmerged_logits(model, tokenizer) -> dict[str, tuple[dict, torch.Tensor]]:
    """side -> (inputs, logits of the unmerged model) for right- and left-padded TEXTS."""
    with torch.no_grad():
        return {
            side: (inputs, model(**inputs))
            for side in ("right", "left")
            for inputs in [padded(tokenizer, side)]
        }


def export_config(folder) -> dict:
    task = get_task("mnli")  # three named labels
    return {"task": task_record(task), "method": "lora", "base_model": {"name": str(folder)}}


def assert_exported_like(folder, expected) -> None:
    """The export folder, loaded as a deployment would, gives the unmerged logits."""
    forward, _ = load_exported(folder)
    with torch.no_grad():
        for side, (inputs, logits) in expected.items():
            assert (forward(**inputs) - logits).abs().max() <= 1e-5, side


def test_the_last_readout_reads_the_rightmost_real_token_either_side():
    hidden = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    ids = torch.zeros(2, 5, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert read_out("last", hidden, right, ids).flatten().tolist() == [2.0, 9.0]
    assert read_out("last", hidden, right.flip(1), ids).flatten().tolist() == [4.0, 9.0]


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoders_export_the_stock_sequence_classification_class(
    model_type, tiny_model_dirs, tmp_path
):
    folder = tiny_model_dirs[model_type]
    model, tokenizer = decoder_model(folder)
    expected = unmerged_logits(model, tokenizer)
    assert not torch.equal(expected["right"][1], expected["right"][1][:1].expand(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        export_format = write_merged(model, tokenizer, export_config(folder), tmp_path)
    assert export_format == "sequence-classification"
    assert not (tmp_path / "head.safetensors").exists()
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert stock.config.pad_token_id == tokenizer.pad_token_id is not None
    assert stock.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    with torch.no_grad():
        for side, (inputs, logits) in expected.items():
            assert (stock(**inputs).logits - logits).abs().max() <= 1e-5, side
    assert_exported_like(tmp_path, expected)


def test_a_head_with_a_bias_exports_as_backbone_and_head_with_a_warning(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["llama"]
    model, tokenizer = decoder_model(folder, bias=True)
    expected = unmerged_logits(model, tokenizer)
    with pytest.warns(UserWarning, match="has no bias and this head has one.*--no-head-bias"):
        export_format = write_merged(model, tokenizer, export_config(folder), tmp_path)
    assert export_format == "backbone+head"
    assert set(load_file(tmp_path / "head.safetensors")) == {"weight", "bias"}
    assert_exported_like(tmp_path, expected)


def test_a_zero_head_bias_still_exports_the_stock_class(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["gpt2"]
    model, tokenizer = decoder_model(folder, bias=True)
    with torch.no_grad():
        model.head.linear.bias.zero_()
    expected = unmerged_logits(model, tokenizer)
    assert write_merged(model, tokenizer, export_config(folder), tmp_path) == (
        "sequence-classification"
    )
    assert_exported_like(tmp_path, expected)


@pytest.mark.parametrize("eos_appended", [False, True])
def test_a_pad_token_that_is_eos(eos_appended, tmp_path):
    """Pad = EOS (no pad token of its own, as GPT-2 and SmolLM2 ship): the stock class reads
    the rightmost token that is not EOS, the same token unless the tokenizer appends EOS."""
    folder = make_tiny_model("llama", tmp_path / "base", tokenizer=decoder_tokenizer(eos_appended))
    model, tokenizer = decoder_model(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.backbone.config.pad_token_id
    expected = unmerged_logits(model, tokenizer)
    out = tmp_path / "export"
    if eos_appended:
        with pytest.warns(UserWarning, match="ends every text with its pad token"):
            assert write_merged(model, tokenizer, export_config(folder), out) == "backbone+head"
    else:
        assert write_merged(model, tokenizer, export_config(folder), out) == (
            "sequence-classification"
        )
    assert_exported_like(out, expected)


def test_bias_free_head_per_example_gradients_match_a_loop(tiny_model_dirs):
    """DP's fast path (substitution) with a head that has no bias."""
    backbone, tokenizer = load_backbone(str(tiny_model_dirs["llama"]))
    torch.manual_seed(0)
    model = TaskModel(backbone, HeadConfig(3, "last", bias=False), build_method("slash", {"d": 8}))
    model.eval()
    rows = [{k: list(v) for k, v in tokenizer(text).items()} for text in TEXTS]
    labels = [0, 2, 1]
    ((inputs, target),) = batches(rows, labels, 3, tokenizer.pad_token_id)
    inputs.pop("token_type_ids", None)
    parameters = model.trainable_state()
    assert "head.linear.bias" not in parameters
    engine = PerExampleGradients(model, parameters)
    assert engine.path == "substitution"
    losses, grads = next(iter(engine(inputs, target)))
    for i, row in enumerate(rows):
        one = {k: torch.tensor([v]) for k, v in row.items() if k != "token_type_ids"}
        loss, reference = loop_gradients(model, parameters, one, torch.tensor([labels[i]]))
        assert torch.allclose(losses[i], loss[0], atol=1e-5)
        for name in parameters:
            assert torch.allclose(grads[name][i], reference[name][0], atol=1e-5), name


def train_cli(folder, toy_files, output, *extra: str) -> dict:
    argv = ["train", "--task", "sst2", "--method", "lora", "--rank", "2", "--max-steps", "1"]
    argv += ["--model", str(folder), "--output", str(output), "--no-progress", *extra]
    argv += ["--train-file", str(toy_files / "train.jsonl")]
    argv += ["--dev-file", str(toy_files / "dev.jsonl"), "--eval-every", "0"]
    assert main(argv) == 0
    return json.loads((output / CONFIG_FILE).read_text())


def test_the_command_line_trains_a_decoder_head_without_a_bias_and_exports_it(
    tiny_model_dirs, toy_files, tmp_path, capsys
):
    folder = tiny_model_dirs["qwen2"]
    record = train_cli(folder, toy_files, tmp_path / "run")
    assert record["head"] == {
        "num_labels": 2,
        "readout": "last",
        "head_dropout": 0.0,
        "bias": False,
    }
    assert "head.linear.bias" not in load_file(tmp_path / "run" / TENSORS_FILE)
    capsys.readouterr()
    assert (
        main(["merge", "--artifact", str(tmp_path / "run"), "--output", str(tmp_path / "m")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["format"] == "sequence-classification"

    record = train_cli(folder, toy_files, tmp_path / "biased", "--head-bias")
    assert record["head"]["bias"] is True
    # Encoders keep their bias by default.
    record = train_cli(tiny_model_dirs["bert"], toy_files, tmp_path / "bert")
    assert record["head"]["bias"] is True and record["head"]["readout"] == "mean"


def test_an_artifact_from_before_the_bias_field_loads_with_a_bias(
    tiny_model_dirs, toy_files, tmp_path
):
    record = train_cli(tiny_model_dirs["bert"], toy_files, tmp_path)
    del record["head"]["bias"]
    record.pop("config_sha256")  # as an artifact from before the field (and the content hash)
    record["format_version"] = 1  # which format 1 is
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    model, _, _ = load_artifact(tmp_path)
    assert model.head_config.bias and model.head.linear.bias is not None
