"""`microtune export --format peft` for SLaSh, JR-WARP, PaFi and HiWi (issue #30).

Each method's artifact on the tiny BERT, its tensors moved well away from their init, goes
microtune -> peft folder -> `PeftModel.from_pretrained` (logits through the exported head equal
microtune's) -> `microtune.peft.to_artifact` -> `microtune.load` (the same logits again). HiWi's
default bias variant is served from its stored P' alone, so its export rebuilds the adapters.
A task trained on the user's own CSV files exports with its check on the user's dev file.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

import microtune
import microtune.peft as mpeft
from microtune.cli import main
from microtune.common.files import EXPORT_FILE, HEAD_FILE
from microtune.errors import MicrotuneError
from microtune.export.peft import ADAPTER_CONFIG_FILE, export_peft, export_peft_and_check
from microtune.tasks.heads import read_out
from tests.conftest import WORDS
from tests.test_serving import make_artifact

OPTIONS = {"slash": {"d": 16}, "jrwarp": {"d": 16}, "pafi": {"k": 50}, "hiwi": {"r": 2}}
TEXTS = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]


def peft_logits(folder, base, tokenizer, adapter: bool = True):
    """Logits as a deployment computes them: peft over the stock base, then the head beside
    (without `adapter`: the head over the plain base)."""
    served = AutoModel.from_pretrained(base).eval()
    if adapter:
        served = PeftModel.from_pretrained(served, folder).eval()
    record = json.loads((folder / EXPORT_FILE).read_text())
    head = load_file(folder / HEAD_FILE)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = served(**batch).last_hidden_state
    features = read_out(
        record["readout"], hidden, batch["attention_mask"], batch["input_ids"], None, None
    )
    return features @ head["weight"].T + head["bias"]


@pytest.mark.parametrize("method", list(OPTIONS))
def test_microtune_to_peft_to_microtune_keeps_the_logits(tiny_model_dirs, tmp_path, method):
    base = tiny_model_dirs["bert"]
    make_artifact(tmp_path / "artifact", base, method, options=OPTIONS[method])
    tuned = microtune.load(tmp_path / "artifact")
    expected = tuned.logits(TEXTS)

    report = export_peft(tmp_path / "artifact", tmp_path / "peft")
    assert report["method"] == method
    settings = json.loads((tmp_path / "peft" / ADAPTER_CONFIG_FILE).read_text())
    assert settings["peft_type"] == f"MICROTUNE_{method.upper()}"
    assert settings["task_type"] == "FEATURE_EXTRACTION"
    found = peft_logits(tmp_path / "peft", base, tuned.tokenizer)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)

    # The adapter matters: the same head over the plain base gives other logits.
    plain = peft_logits(tmp_path / "peft", base, tuned.tokenizer, adapter=False)
    assert (plain - expected).abs().max() > 1e-3

    mpeft.to_artifact(tmp_path / "peft", tmp_path / "back")
    back = microtune.load(tmp_path / "back")
    torch.testing.assert_close(back.logits(TEXTS), expected, rtol=0, atol=1e-5)
    assert back.label_names == tuned.label_names
    assert back.config["head"]["readout"] == tuned.config["head"]["readout"]


def test_the_export_check_loads_the_folder_with_peft(tiny_model_dirs, tmp_path, data_dir):
    make_artifact(tmp_path / "artifact", tiny_model_dirs["bert"], "hiwi", options={"r": 2})
    report = export_peft_and_check(
        tmp_path / "artifact", tmp_path / "peft", data_dir=str(data_dir), examples=8
    )
    assert report["examples"] == 8
    assert report["max_abs_logit_diff"] <= 1e-5


def test_other_methods_are_refused_naming_the_merged_format(tiny_model_dirs, tmp_path):
    make_artifact(tmp_path / "bitfit", tiny_model_dirs["bert"], "bitfit")
    with pytest.raises(MicrotuneError, match="'bitfit'; export it with --format merged"):
        export_peft(tmp_path / "bitfit", tmp_path / "out")


def write_csv(path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for _ in range(size):
            words = rng.sample(WORDS, 5)
            good = {"good", "great", "fun", "best", "love"} & set(words)
            writer.writerow([" ".join(words), "pos" if good else "neg"])


def test_a_task_trained_on_csv_files_exports_with_its_check_on_the_dev_file(
    tiny_model_dirs, tmp_path, capsys
):
    write_csv(tmp_path / "train.csv", 48, 0)
    write_csv(tmp_path / "dev.csv", 12, 1)
    files = ["--train-file", str(tmp_path / "train.csv"), "--dev-file", str(tmp_path / "dev.csv")]
    train = ["train", "--task", "classification", "--method", "slash", "--d", "16", *files]
    columns = ["--text-columns", "review", "--label-column", "sentiment"]
    model = ["--model", str(tiny_model_dirs["bert"]), "--max-steps", "3"]
    assert main([*train, *columns, *model, "--output", str(tmp_path / "run")]) == 0
    export = ["export", "--format", "peft", "--artifact", str(tmp_path / "run")]
    capsys.readouterr()
    assert main([*export, "--output", str(tmp_path / "nofile")]) == 2
    assert "--data-file for eval and export" in capsys.readouterr().err
    argv = [*export, "--output", str(tmp_path / "peft"), "--dev-file", str(tmp_path / "dev.csv")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 12 and report["max_abs_logit_diff"] <= 1e-5
    tuned = microtune.load(tmp_path / "run")
    found = peft_logits(tmp_path / "peft", tiny_model_dirs["bert"], tuned.tokenizer)
    torch.testing.assert_close(found, tuned.logits(TEXTS), rtol=0, atol=1e-5)
