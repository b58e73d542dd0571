"""The Python API (`microtune.load`), `microtune predict`, and LoRA exports in peft's format."""

import io
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import microtune
from microtune import api, cli
from microtune.artifacts.store import save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint, load_backbone
from microtune.common.files import EXPORT_FILE, HEAD_FILE
from microtune.errors import MicrotuneError
from microtune.export.peft import ADAPTER_CONFIG_FILE, export_peft
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.heads import read_out
from microtune.tasks.spec import get_task

from .conftest import REPO

TEXTS = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]
PAIRS = [("the film is good", "it was great"), ("a dull plot", "bad"), ("love it", "hate")]


def make_artifact(folder, model_dir, method="lora", task="sst2", options=None, seed=0):
    """Save an artifact of `method` on a tiny model, its tensors moved well away from their
    init (LoRA's B starts at zero), so a wrong fold or a wrong name would show."""
    backbone, tokenizer = load_backbone(str(model_dir))
    base_fingerprint = fingerprint(backbone)
    torch.manual_seed(seed)
    task_spec = get_task(task)
    readout = api.default_readout(arch_for(backbone).causal)
    model = TaskModel(
        backbone,
        HeadConfig(num_labels=task_spec.num_labels, readout=readout),
        build_method(method, options),
        mask_token_id=tokenizer.mask_token_id,
    )
    with torch.no_grad():
        for parameter in model.method.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    save_artifact(
        folder,
        model,
        method_name=method,
        base_model=str(model_dir),
        base_fingerprint=base_fingerprint,
        task=api.task_record(task_spec),
        max_length=32,
    )
    return folder


@pytest.fixture(scope="module")
def lora_artifact(tmp_path_factory, tiny_model_dirs):
    return make_artifact(tmp_path_factory.mktemp("lora"), tiny_model_dirs["bert"])


def reference_logits(loaded, texts, seconds=None):
    """The TaskModel's own forward on a tokenised batch, bypassing the serving code."""
    batch = loaded.tokenizer(texts, seconds, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.task_model(**batch)


def test_predict_is_the_argmax_of_the_task_model_with_label_names(lora_artifact):
    model = microtune.load(lora_artifact)
    assert model.config["method"] == "lora" and model.tokenizer is not None
    expected = reference_logits(model, TEXTS)
    assert torch.allclose(model.logits(TEXTS), expected, atol=1e-6)
    probabilities = expected.softmax(-1)
    predictions = model.predict(TEXTS)
    assert [p["label"] for p in predictions] == [
        ("negative", "positive")[i] for i in expected.argmax(-1).tolist()
    ]
    for prediction, row in zip(predictions, probabilities, strict=True):
        assert prediction["score"] == pytest.approx(row.max().item(), abs=1e-6)
    assert model.predict(TEXTS[0]) == predictions[:1]  # one text is a list of one
    assert model.predict([]) == []
    with torch.no_grad():  # a negated head flips every label: the names follow the argmax
        for parameter in model.task_model.head.parameters():
            parameter.neg_()
    flipped = {"negative": "positive", "positive": "negative"}
    assert [p["label"] for p in model.predict(TEXTS)] == [flipped[p["label"]] for p in predictions]


def test_pair_tasks_take_tuples_or_column_dicts(tmp_path, tiny_model_dirs):
    model = microtune.load(make_artifact(tmp_path, tiny_model_dirs["bert"], task="rte"))
    firsts, seconds = zip(*PAIRS, strict=True)
    expected = reference_logits(model, list(firsts), list(seconds))
    assert torch.allclose(model.logits(PAIRS), expected, atol=1e-6)
    as_dicts = [{"sentence1": a, "sentence2": b} for a, b in PAIRS]
    assert model.predict(as_dicts) == model.predict(PAIRS)
    with pytest.raises(MicrotuneError, match=r"takes 2 text\(s\) per input.*pairs"):
        model.predict(["one text only"])
    with pytest.raises(MicrotuneError, match="input 0 has no 'sentence2'"):
        model.predict([{"sentence1": "a"}])
    with pytest.raises(MicrotuneError, match=r"input 1 is \[7\]; task rte takes 2 text"):
        model.predict([PAIRS[0], 7])  # not a text: one line, not a TypeError


@pytest.mark.parametrize("method", ["lora", "slash"])
def test_merge_keeps_the_logits(tmp_path, tiny_model_dirs, method):
    model = microtune.load(make_artifact(tmp_path, tiny_model_dirs["bert"], method))
    base = TaskModel(load_backbone(str(tiny_model_dirs["bert"]))[0], model.task_model.head_config)
    base.head.load_state_dict(model.task_model.head.state_dict())
    base.eval()
    unmerged = model.logits(TEXTS)
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (base(**batch) - unmerged).abs().max() > 1e-2  # the method changes the outputs
    assert not model.merged
    assert model.merge() is model and model.merged  # the backbone alone now carries it
    assert (model.logits(TEXTS) - unmerged).abs().max() <= 1e-5


def test_save_pretrained_reloads_with_plain_transformers(tmp_path, lora_artifact):
    model = microtune.load(lora_artifact)
    unmerged = model.logits(TEXTS)
    assert model.save_pretrained(tmp_path / "merged") == "sentence-transformers"
    logits_fn, loaded = api.load_exported(tmp_path / "merged")
    assert type(loaded[0].auto_model).__name__ == "BertModel"  # a stock transformers class
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (logits_fn(**batch) - unmerged).abs().max() <= 1e-5


def test_non_mergeable_methods_are_refused(tmp_path, tiny_model_dirs):
    model = microtune.load(make_artifact(tmp_path / "a", tiny_model_dirs["bert"], "adapter"))
    assert len(model.predict(TEXTS)) == 4  # served unmerged
    for action in (model.merge, lambda: model.save_pretrained(tmp_path / "out")):
        with pytest.raises(MicrotuneError, match="method 'adapter' cannot be merged"):
            action()
    assert not (tmp_path / "out").exists()


def test_a_missing_artifact_offline_is_one_clear_line(tmp_path):
    with pytest.raises(MicrotuneError, match="is not a local folder and the hub is offline"):
        microtune.load("someone/some-artifact")
    with pytest.raises(MicrotuneError, match="is not a folder"):
        microtune.load(tmp_path / "nowhere")


def test_import_microtune_stays_cheap():
    code = "import sys, microtune; print('torch' in sys.modules, callable(microtune.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# -- peft's format ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_peft_loads_the_export_with_the_same_outputs(tmp_path, tiny_model_dirs, model_type):
    from peft import PeftModel
    from transformers import AutoModel

    model_dir = tiny_model_dirs[model_type]
    loaded = microtune.load(make_artifact(tmp_path / "artifact", model_dir))
    report = export_peft(tmp_path / "artifact", tmp_path / "peft")
    adapter_config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG_FILE).read_text())
    assert adapter_config["fan_in_fan_out"] is (model_type == "gpt2")  # GPT-2's Conv1D
    assert report["targets"] == (2 if model_type == "gpt2" else 4)  # c_attn; query and value

    served = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), tmp_path / "peft")
    served.eval()
    task_model = loaded.task_model
    batch = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    if not task_model.arch.token_type_ids:
        del batch["token_type_ids"]
    with torch.no_grad():
        ours = task_model.method.run_backbone(task_model.backbone, **batch).last_hidden_state
        theirs = served(**batch).last_hidden_state
        with served.disable_adapter():  # the adapter really changes the model
            assert (served(**batch).last_hidden_state - theirs).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-5

    info = json.loads((tmp_path / "peft" / EXPORT_FILE).read_text())
    head = load_file(tmp_path / "peft" / HEAD_FILE)
    features = read_out(
        info["readout"], theirs, batch["attention_mask"], batch["input_ids"], None, None
    )
    expected = reference_logits(loaded, TEXTS)
    assert ((features @ head["weight"].T + head["bias"]) - expected).abs().max() <= 1e-5
    logits_fn, _ = api.load_exported(tmp_path / "peft")  # microtune's loader of exports
    with torch.no_grad():
        assert (logits_fn(**batch) - expected).abs().max() <= 1e-5


def test_cli_export_format_peft_checks_against_peft(lora_artifact, tmp_path, data_dir):
    report = cli.run(
        [
            "export",
            "--artifact",
            str(lora_artifact),
            "--output",
            str(tmp_path / "peft"),
            "--format",
            "peft",
            "--data-dir",
            str(data_dir),
            "--check-examples",
            "16",
        ]
    )
    assert report["format"] == "peft+head" and report["examples"] == 16
    assert report["max_abs_logit_diff"] <= 1e-5
    # Without check data (offline, no --data-dir) nothing is written.
    args = ["export", "--artifact", str(lora_artifact), "--output", str(tmp_path / "no-data")]
    with pytest.raises(MicrotuneError, match="no --data-dir"):
        cli.run([*args, "--format", "peft"])
    assert not (tmp_path / "no-data").exists()


# -- `microtune predict` ---------------------------------------------------------------------


def test_cli_predict_reads_stdin_lines(lora_artifact, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS) + "\n\n"))
    assert cli.main(["predict", "--artifact", str(lora_artifact)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == microtune.load(lora_artifact).predict(TEXTS)


def test_cli_predict_reads_jsonl_for_pair_tasks(tmp_path, tiny_model_dirs):
    artifact = make_artifact(tmp_path / "rte", tiny_model_dirs["bert"], task="rte")
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b}) + "\n" for a, b in PAIRS)
    )
    found = cli.run(["predict", "--artifact", str(artifact), "--input", str(inputs)])
    assert found == microtune.load(artifact).predict(PAIRS)
    inputs.write_text("a plain line\n")
    with pytest.raises(MicrotuneError, match="line 1: not valid JSON"):
        cli.run(["predict", "--artifact", str(artifact), "--input", str(inputs)])
    with pytest.raises(MicrotuneError, match="cannot read --input"):
        cli.run(["predict", "--artifact", str(artifact), "--input", str(tmp_path / "none")])


def test_export_guide_python_snippet_runs(lora_artifact, tmp_path):
    readme = (REPO / "docs" / "guides" / "export.md").read_text()
    snippet = re.search(r"<!-- python-api-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace('load("runs/sst2")', f'load("{lora_artifact}")')
    snippet = snippet.replace('"runs/sst2-merged"', f'"{tmp_path / "merged"}"')
    namespace: dict = {}
    exec(snippet, namespace)
    assert namespace["predictions"] == microtune.load(lora_artifact).predict(
        ["a gripping , funny film", "dull and lifeless"]
    )
    assert namespace["model"].merged
    assert (tmp_path / "merged" / "0_Transformer" / "model.safetensors").is_file()
