"""`microtune eval`'s report: a status line while it loads (`predict` too), a progress bar
over the evaluation's batches (at the end of training too), per-class numbers and the confusion
matrix for classification, in the JSON and as a table."""

import json
import subprocess
import sys

import pytest
from sklearn.metrics import classification_report, confusion_matrix

import microtune
from microtune import __main__ as entry_point
from microtune import api
from microtune.cli import main, predict
from microtune.cli.parser import parse
from microtune.tasks.metrics import per_class_report
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig


def train_args(model, data, output, *extra):
    return [
        "train",
        "--task",
        "classification",
        "--train-file",
        str(data / "train.jsonl"),
        "--dev-file",
        str(data / "dev.jsonl"),
        "--text-columns",
        "sentence",
        "--model",
        str(model),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="module")
def artifact(tiny_model_dirs, toy_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-report") / "art"
    assert main(train_args(tiny_model_dirs["bert"], toy_files, folder, "--no-progress")) == 0
    return folder


def test_per_class_report_matches_hand_counts():
    report = per_class_report([0, 1, 1, 1, 1], [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert report["per_class"]["b"]["precision"] == 0.5 and report["per_class"]["b"]["recall"] == 1
    # never predicted: 0.0, not NaN
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["confusion_matrix"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[1, 1, 0], [0, 2, 0], [0, 1, 0]],
    }


def test_eval_reports_per_class_numbers_and_the_confusion_matrix(artifact, toy_files, capsys):
    dev = toy_files / "dev.jsonl"
    assert main(["eval", "--artifact", str(artifact), "--dev-file", str(dev)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    truth = [str(row["label"]) for row in rows]
    predicted = [
        p["label"] for p in microtune.load(artifact).predict([r["sentence"] for r in rows])
    ]
    expected = classification_report(truth, predicted, output_dict=True, zero_division=0)
    assert set(result["per_class"]) == {"0", "1"}
    for name, numbers in result["per_class"].items():
        assert numbers["support"] == expected[name]["support"] == truth.count(name)
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert numbers[key] == pytest.approx(expected[name][theirs])
    names = result["confusion_matrix"]["labels"]
    assert (
        result["confusion_matrix"]["matrix"]
        == confusion_matrix(truth, predicted, labels=names).tolist()
    )
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    # The table on stderr: the metrics, a row per label, the matrix.
    assert "confusion matrix (rows: true label, columns: predicted)" in err
    assert f"accuracy              {result['accuracy']:.4f}" in err
    row = result["per_class"]["1"]
    assert f"{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}" in err


def test_eval_shows_a_bar_over_its_batches_unless_no_progress(artifact, toy_files, capsys):
    dev = str(toy_files / "dev.jsonl")
    quiet = api.evaluate_artifact(
        artifact, data=DataSource(dev_file=dev), batch_size=8, progress=False
    )
    assert "evaluate" not in capsys.readouterr().err
    shown = api.evaluate_artifact(artifact, data=DataSource(dev_file=dev), batch_size=8)
    assert shown == quiet
    err = capsys.readouterr().err
    assert "evaluate: 100%" in err and "4/4 [" in err  # 32 dev rows, 8 a batch
    assert main(["eval", "--artifact", str(artifact), "--dev-file", dev, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "evaluate" not in err and "confusion matrix" in err


def base_model_line(artifact) -> str:
    name = json.loads((artifact / "microtune.json").read_text())["base_model"]["name"]
    return f"microtune: loading base model {name}…"


def test_eval_says_what_it_loads_before_its_bar_and_keeps_stdout_json(artifact, toy_files, capsys):
    dev = str(toy_files / "dev.jsonl")
    assert main(["eval", "--artifact", str(artifact), "--dev-file", dev]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["accuracy"] is not None  # stdout is the JSON object alone
    assert err.splitlines()[0] == base_model_line(artifact)  # first, then the bar
    assert err.index("evaluate:") > len(base_model_line(artifact))
    assert main(["eval", "--artifact", str(artifact), "--dev-file", dev, "--no-progress"]) == 0
    assert "loading" not in capsys.readouterr().err


def test_the_script_shows_the_line_once_before_its_heavy_imports(
    artifact, toy_files, capsys, monkeypatch
):
    dev = str(toy_files / "dev.jsonl")
    monkeypatch.setattr(
        sys, "argv", ["microtune", "eval", "--artifact", str(artifact), "--dev-file", dev]
    )
    assert entry_point.entry() == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert err.count("microtune: loading base model") == 1
    # What entry() runs before importing torch and transformers needs neither of them.
    code = (
        "import sys; from microtune.cli.app import announce; from microtune.cli.parser import "
        f"parse; announce(parse(['eval', '--artifact', {str(artifact)!r}])); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert done.stderr.strip() == base_model_line(artifact)


def test_predict_says_what_it_loads_on_stderr_only(artifact, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("a fine film\na dull one\n")
    assert main(["predict", "--artifact", str(artifact), "--input", str(texts)]) == 0
    out, err = capsys.readouterr()
    assert [set(json.loads(line)) for line in out.splitlines()] == [{"label", "score"}] * 2
    assert err.splitlines() == [base_model_line(artifact)]
    assert main(["predict", "--artifact", str(tmp_path / "none"), "--input", str(texts)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"microtune: loading artifact {tmp_path / 'none'} and its base model…"
    assert err[1].startswith("microtune: error:")
    exported = parse(["predict", "--model-folder", "exports/sst2"])
    assert predict.status(exported) == "loading export folder exports/sst2…"


def test_the_end_of_training_evaluation_has_its_own_bar(
    tiny_model_dirs, toy_files, tmp_path, capsys
):
    data = microtune.DataSource(
        train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
    )
    settings = dict(max_steps=2, batch_size=8, eval_batch_size=8, eval_every=0)
    api.train(
        "sst2",
        "slash",
        tmp_path / "shown",
        model=str(tiny_model_dirs["bert"]),
        data=data,
        train_config=TrainConfig(**settings),
    )
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2 [" in err
    assert "evaluate: 100%" in err and "4/4 [" in err  # 32 dev rows, 8 a batch
    api.train(
        "sst2",
        "slash",
        tmp_path / "quiet",
        model=str(tiny_model_dirs["bert"]),
        data=data,
        train_config=TrainConfig(**settings, progress=False),
    )
    assert "evaluate" not in capsys.readouterr().err
