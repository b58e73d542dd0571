"""Artifacts and exports on the real packaged MiniLM and real SST-2 inputs."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from microtune import api
from microtune.artifacts.store import load_artifact, load_base, save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.common.choices import DEFAULT_MODEL
from microtune.common.files import TENSORS_FILE
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.data import encode
from microtune.tasks.examples import load_examples
from microtune.tasks.inference import predict
from microtune.tasks.spec import DataSource, get_task
from microtune.training.config import TrainConfig

from .conftest import REPO, make_tiny_model
from .test_serving import make_artifact


@pytest.fixture(scope="module")
def sst2_dev(data_dir):
    return load_examples(get_task("sst2"), "validation", data_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A short real SLaSh run on SST-2: (artifact folder, metrics.json contents)."""
    folder = tmp_path_factory.mktemp("sst2-slash")
    report = api.train(
        "sst2",
        "slash",
        folder,
        data=DataSource(data_dir=str(data_dir), max_train_examples=2000),
        train_config=TrainConfig(max_steps=30, eval_every=0, progress=False),
    )
    return folder, report


def random_slash_model(readout="mean", seed=0):
    backbone, tokenizer = load_backbone()
    base_fingerprint = fingerprint(backbone)
    torch.manual_seed(seed)
    model = TaskModel(
        backbone,
        HeadConfig(num_labels=2, readout=readout),
        build_method("slash", {"projection_seed": 5}),
        mask_token_id=tokenizer.mask_token_id,
    )
    with torch.no_grad():
        model.method.z.mul_(30.0)  # a large shift, so any folding error would show
    return model.eval(), tokenizer, base_fingerprint


def test_reload_gives_bit_identical_predictions(tmp_path, sst2_dev):
    model, tokenizer, base_fingerprint = random_slash_model()
    save_artifact(
        tmp_path,
        model,
        method_name="slash",
        base_model=DEFAULT_MODEL,
        base_fingerprint=base_fingerprint,
        task=api.task_record(get_task("sst2")),
        max_length=128,
    )
    rows = encode(tokenizer, sst2_dev[:96])
    before = predict(model, rows, tokenizer.pad_token_id)
    reloaded, _, config = load_artifact(tmp_path)
    after = predict(reloaded, rows, tokenizer.pad_token_id)
    assert (before == after).all()
    assert config["method_config"]["projection_seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "microtune.json"]


def test_training_report_and_eval_agree(trained, data_dir):
    folder, report = trained
    assert report["trainable_parameters"] == {"head": 770, "method": 1024, "total": 1794}
    assert report["artifact_bytes"] < 20_000
    assert report["metrics"]["accuracy"] > 0.6  # 30 steps already beat chance (0.51)
    metrics = api.evaluate_artifact(folder, data=DataSource(data_dir=str(data_dir)))
    assert metrics == report["metrics"]


def test_a_different_base_model_is_refused(trained, tmp_path, tiny_model_dirs):
    folder, _ = trained
    with pytest.raises(MicrotuneError, match="base model mismatch.*pass --model"):
        load_artifact(folder, model_name=str(tiny_model_dirs["bert"]))
    # The same architecture with one weight nudged is a different base model too.
    backbone, tokenizer = load_backbone()
    with torch.no_grad():
        backbone.encoder.layer[3].output.dense.weight[0, 0] += 1e-3
    backbone.save_pretrained(tmp_path / "nudged")
    tokenizer.save_pretrained(tmp_path / "nudged")
    with pytest.raises(MicrotuneError, match="base model mismatch"):
        load_artifact(folder, model_name=str(tmp_path / "nudged"))


def test_a_mismatch_names_the_base_model_actually_loaded(tmp_path, tiny_model_dirs):
    """Issue 32: a base loaded once and shared (load_many, the server) is named as what it is,
    not as the artifact's base a second time."""
    trained_on = tiny_model_dirs["bert"]
    folder = make_artifact(tmp_path / "art", trained_on)
    other = make_tiny_model("bert", tmp_path / "other", seed=1)
    for kwargs in ({"base_model": load_base(folder, str(other))}, {"model_name": str(other)}):
        with pytest.raises(MicrotuneError) as error:
            load_artifact(folder, **kwargs)
        message = str(error.value)
        assert f"trained on '{trained_on}' (" in message, message
        assert f"but '{other}' has" in message, message


def test_tampered_tensors_are_refused(trained, tmp_path):
    import shutil

    folder, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / TENSORS_FILE)
    tensors["method.z"] = tensors["method.z"] + 1
    save_file(tensors, copy / TENSORS_FILE)
    with pytest.raises(MicrotuneError, match="does not match microtune.json"):
        load_artifact(copy)


def test_export_matches_unmerged_and_keeps_the_base_architecture(trained, tmp_path, data_dir):
    folder, _ = trained
    report = api.export_and_check(folder, tmp_path / "merged", data_dir=str(data_dir), examples=128)
    assert report["format"] == "sentence-transformers"  # mean pooling: no stock class
    assert report["max_abs_logit_diff"] <= 1e-5
    assert report["merged_parameters"] == report["base_parameters"] == 22_713_216


def test_pooler_readout_exports_for_sequence_classification(tmp_path, sst2_dev):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer, base_fingerprint = random_slash_model(readout="pooler")
    rows = encode(tokenizer, sst2_dev[:64])
    unmerged = predict(model, rows, tokenizer.pad_token_id)
    config = {
        "task": api.task_record(get_task("sst2")),
        "method": "slash",
        "base_model": {"name": DEFAULT_MODEL, "fingerprint": base_fingerprint},
    }
    assert api.export_merged(model, tokenizer, config, tmp_path) == "sequence-classification"
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    batch = tokenizer(
        [e.texts[0] for e in sst2_dev[:64]],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = plain(**batch).logits.numpy()
    assert abs(logits - unmerged).max() <= 1e-5


def test_export_guide_loading_snippet_runs_without_microtune(trained, tmp_path, data_dir):
    """The export guide's few lines load the default export (mean pooling) with
    sentence-transformers alone, and its logits are the artifact's."""
    import microtune

    folder, _ = trained
    api.merge_artifact(folder, tmp_path / "merged")
    readme = (REPO / "docs" / "guides" / "export.md").read_text()
    snippet = re.search(r"<!-- export-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert "microtune" not in snippet
    snippet = re.sub(r'folder = ".*?"', f'folder = "{tmp_path / "merged"}"', snippet)
    namespace: dict = {}
    exec(snippet, namespace)
    expected = microtune.load(folder).logits(["a gripping , funny film", "dull and lifeless"])
    assert torch.allclose(namespace["logits"], expected, atol=1e-5)
