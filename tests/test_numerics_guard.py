"""Issue 12, numerics and input bounds: a diverged run, a non-finite option, a bad data file or
a corrupt checkpoint each end in one line that names the problem, and nothing is saved as a
finished artifact."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from microtune import cli
from microtune.common.files import CHECKPOINT_FILE
from microtune.errors import MicrotuneError
from microtune.export import merged as export
from microtune.methods.base import MethodConfig
from microtune.tasks.examples import load_examples
from microtune.tasks.metrics import UndefinedMetricWarning, compute_metrics
from microtune.tasks.spec import Task, get_task
from microtune.training.config import TrainConfig
from microtune.training.steps import AdamWStep, Diverged

ARTIFACT_FILES = ("adapter.safetensors", "microtune.json", "metrics.json")


def cli_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    capsys.readouterr()  # drop what building the tiny model printed
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def train_argv(tiny_model_dirs, toy_files, output, *extra) -> list[str]:
    return [
        "train",
        "--task",
        "sst2",
        "--model",
        str(tiny_model_dirs["bert"]),
        "--train-file",
        str(toy_files / "train.jsonl"),
        "--dev-file",
        str(toy_files / "dev.jsonl"),
        "--output",
        str(output),
        "--batch-size",
        "8",
        "--no-progress",
        *([] if "--epochs" in extra else ["--max-steps", "3"]),
        *extra,
    ]


def assert_no_artifact(folder) -> None:
    assert not any((folder / name).exists() for name in ARTIFACT_FILES)


# -- the numerics guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        # The update itself blows up: the second forward pass gives NaN.
        (["--method", "full", "--lr", "1e6"], "diverged at step 2: the loss is nan; lower --lr"),
        # The starting model is already broken: the learning rate is not blamed.
        (
            ["--method", "slash", "--d", "8", "--projection-std-scale", "1e30"],
            "diverged at step 1: the loss is nan; the starting model already gives it",
        ),
        # DP-SGD's step is covered by the same guard.
        (
            [
                "--method",
                "full",
                "--lr",
                "1e6",
                "--dp-sigma",
                "1",
                "--dp-batch",
                "8",
                "--dp-noise-seed",
                "0",
            ],
            "diverged at step 2: the loss is nan; lower --lr (now 1e+06)",
        ),
    ],
)
def test_a_diverged_run_stops_naming_the_step_and_saves_nothing(
    capsys, tmp_path, tiny_model_dirs, toy_files, extra, expected
):
    output = tmp_path / "run"
    error = cli_error(capsys, train_argv(tiny_model_dirs, toy_files, output, *extra))
    assert expected in error
    assert_no_artifact(output)
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["diverged"] == "the loss is nan"  # strict JSON, and says why it stopped


class _Broken(AdamWStep):
    """A step whose backward pass leaves a NaN gradient, or an inf parameter (an overflow)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def gradients(self, model, micro_batches, logical_size) -> float:
        for parameter in self.parameters.values():
            parameter.grad = torch.ones_like(parameter)
        weight = self.parameters["weight"]
        if self.what == "grad":
            weight.grad[0, 1] = math.nan
        else:
            weight.data[1, 0] = math.inf
        return 0.25


@pytest.mark.parametrize(
    "what, expected, before_update",
    [
        ("grad", "a gradient is not finite", True),
        ("param", "a trainable parameter is not finite after the update", False),
    ],
)
def test_the_step_checks_gradients_before_and_parameters_after_the_update(
    what, expected, before_update
):
    model = nn.Linear(2, 2)
    step = _Broken(what)
    step.bind(model, dict(model.named_parameters()), TrainConfig(max_steps=2, learning_rate=0.1), 2)
    with pytest.raises(Diverged, match=expected) as caught:
        step(model, [], 1)
    assert caught.value.before_update is before_update


# -- run options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--epochs", "inf"], "--epochs must be positive and finite, got inf"),
        (["--epochs", "nan"], "--epochs must be positive and finite, got nan"),
        (["--lr", "inf"], "--lr must be positive and at most 1e+06, got inf"),
        (["--lr", "nan"], "--lr must be positive and at most 1e+06, got nan"),
        (["--head-lr", "0"], "--head-lr must be positive and at most 1e+06, got 0.0"),
        (["--weight-decay", "-1"], "--weight-decay must be in [0, 1e+06] (0: none), got -1.0"),
        (["--weight-decay", "inf"], "--weight-decay must be in [0, 1e+06] (0: none), got inf"),
        (["--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1), got nan"),
        (["--seed", str(2**64)], "--seed must be a whole number in 0..4294967295"),
        (["--seed", "-1"], "--seed must be a whole number in 0..4294967295, got -1"),
        (
            ["--grad-accum", "1000"],
            "--batch-size 8 x --grad-accum 1000 = 8000 examples per step, more than the 96 "
            "training examples; use --grad-accum 12 or less",
        ),
        (
            ["--projection-std-scale", "inf"],
            "--projection-std-scale must be a finite number, got inf",
        ),
        (["--method", "lora", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
        (["--method", "pafi", "--k", "inf"], "--k must be a finite number, got inf"),
        (["--method", "pafi", "--mask-seed", str(2**70)], "--mask-seed must be a whole number"),
    ],
)
def test_run_options_out_of_bounds_are_refused_before_any_work(
    capsys, tmp_path, tiny_model_dirs, toy_files, extra, expected
):
    output = tmp_path / "run"
    error = cli_error(capsys, train_argv(tiny_model_dirs, toy_files, output, *extra))
    assert expected in error
    assert_no_artifact(output)


def test_every_method_config_gets_the_finite_check_for_free():
    from dataclasses import dataclass

    @dataclass
    class FutureConfig(MethodConfig):
        scale: float = 1.0
        seed: int = 0

        def __post_init__(self) -> None:  # its own checks, without calling super()
            if int(self.scale) > 100:  # int(inf) would raise OverflowError
                raise MicrotuneError("scale too large")

    with pytest.raises(MicrotuneError, match="--scale must be a finite number, got inf"):
        FutureConfig(scale=math.inf)
    with pytest.raises(MicrotuneError, match="--seed must be a whole number"):
        FutureConfig.from_dict({"seed": 2**40})
    assert FutureConfig(scale=2.0).scale == 2.0


# -- data files ---------------------------------------------------------------------------------


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


STSB_ROW = '{"sentence1": "a", "sentence2": "b", "label": %s}\n'
SST2_ROW = '{"sentence": "a film", "label": %s}\n'


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("nan.jsonl", STSB_ROW % "1.0" + STSB_ROW % "NaN", "row 2: label nan is not a finite"),
        ("nan_text.jsonl", STSB_ROW % '"nan"', "row 1: label 'nan' is not a finite number"),
        ("inf.jsonl", STSB_ROW % "Infinity", "row 1: label inf is not a finite number"),
        ("inf.csv", "sentence1,sentence2,label\na,b,2.5\na,b,inf\n", "row 2: label 'inf' is not"),
        ("bool.jsonl", STSB_ROW % "true", "row 1: label true is not a valid label"),
    ],
)
def test_non_finite_regression_labels_are_refused_naming_file_and_row(
    tmp_path, name, text, expected
):
    path = write(tmp_path / name, text)
    with pytest.raises(MicrotuneError, match="label") as caught:
        load_examples(get_task("stsb"), "train", data_file=path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "latin1.jsonl",
            SST2_ROW.encode() % b"1" + "caf\xe9".encode("latin-1"),
            "line 2: not UTF-8",
        ),
        ("array.json", '[{"sentence": "a", "label": 1}, 3]', "element 2: expected a JSON object"),
        ("lines.jsonl", SST2_ROW % "1" + "[1, 2]\n", "line 2: expected a JSON object per line"),
        ("broken.jsonl", SST2_ROW % "1" + '{"sentence": \n', "line 2: not valid JSON"),
        ("columns.jsonl", '{"text": "a", "label": 1}\n', "missing column(s) ['sentence']"),
        (
            "null.jsonl",
            '{"sentence": null, "label": 1}\n',
            "row 1: no value in column(s) ['sentence']",
        ),
        ("empty.jsonl", "", "has no rows"),
        ("empty.csv", "", "has no rows"),
        ("short.csv", "sentence,label\na film\n", "row 1: no value in column(s) ['label']"),
        ("long.csv", "sentence,label\na,film,1\n", "line 2: more fields than the header's 2"),
        ("outside.jsonl", SST2_ROW % "2", "row 1: label 2 is outside 0..1"),
        ("fraction.jsonl", SST2_ROW % "0.7", "row 1: label 0.7 is not a class index"),
        ("name.jsonl", SST2_ROW % '"great"', "row 1: label 'great' is not a class index"),
        ("huge.jsonl", SST2_ROW % "1e400", "row 1: label inf is not a class index"),
    ],
)
def test_malformed_data_files_are_one_line_errors_naming_the_place(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(MicrotuneError) as caught:
        load_examples(get_task("sst2"), "train", data_file=path)
    message = str(caught.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_good_data_files_still_load(tmp_path):
    bom = write(tmp_path / "bom.csv", "\ufeffsentence,label\na film,positive\nno,0\n")
    assert [e.label for e in load_examples(get_task("sst2"), "train", data_file=bom)] == [1, 0]
    whole = write(tmp_path / "whole.json", '{"data": [{"sentence": "a", "label": 1.0}]}')
    assert load_examples(get_task("sst2"), "train", data_file=whole)[0].label == 1


@pytest.mark.parametrize(
    "task_name, split",
    [("sst2", "../../secret"), ("sst2", "a/b"), ("sst2", ".."), ("../sst2", "train")],
)
def test_task_names_and_splits_cannot_leave_the_data_folder(tmp_path, task_name, split):
    data_dir = tmp_path / "data"
    write(data_dir / "glue" / "sst2" / "train.jsonl", SST2_ROW % "1")
    write(tmp_path / "secret.jsonl", SST2_ROW % "1")  # what ../../secret would reach
    task = Task(task_name, ("sentence",), 2, ("accuracy",))
    with pytest.raises(MicrotuneError, match="cannot name a data file"):
        load_examples(task, split, data_dir=data_dir)


def test_a_link_out_of_the_data_folder_is_refused(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "glue" / "sst2").mkdir(parents=True)
    outside = write(tmp_path / "elsewhere.jsonl", SST2_ROW % "1")
    (data_dir / "glue" / "sst2" / "train.jsonl").symlink_to(outside)
    with pytest.raises(MicrotuneError, match="leads outside --data-dir"):
        load_examples(get_task("sst2"), "train", data_dir=data_dir)


def test_a_nan_label_file_stops_the_cli_before_training(capsys, tmp_path, tiny_model_dirs):
    train = write(tmp_path / "train.jsonl", STSB_ROW % "1.5" + STSB_ROW % "NaN")
    output = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "stsb",
        "--model",
        str(tiny_model_dirs["bert"]),
        "--train-file",
        str(train),
        "--dev-file",
        str(train),
        "--output",
        str(output),
        "--max-steps",
        "1",
    ]
    assert f"{train}, row 2: label nan is not a finite number" in cli_error(capsys, argv)
    assert_no_artifact(output)


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", ["truncated", "bad json", "missing entries"])
def test_a_corrupt_checkpoint_is_named_with_the_fix(
    capsys, tmp_path, tiny_model_dirs, toy_files, corruption
):
    output = tmp_path / "run"
    output.mkdir()
    checkpoint = output / CHECKPOINT_FILE
    if corruption == "truncated":
        save_file({"model.x": torch.zeros(64)}, checkpoint, metadata={"json": "{}"})
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    elif corruption == "bad json":
        save_file({"model.x": torch.zeros(4)}, checkpoint, metadata={"json": '{"step": '})
    else:
        save_file({"model.x": torch.zeros(4)}, checkpoint, metadata={"json": '{"step": 2}'})
    before = checkpoint.read_bytes()
    argv = train_argv(tiny_model_dirs, toy_files, output, "--resume", "--method", "bitfit")
    error = cli_error(capsys, argv)
    assert f"checkpoint {checkpoint} is unreadable (" in error
    assert "pass --overwrite instead of --resume to start over" in error
    assert checkpoint.read_bytes() == before  # the user's file is left as it was
    assert_no_artifact(output)


# -- metrics and the export check -----------------------------------------------------------------


def test_undefined_metrics_are_recorded_as_null_with_a_warning():
    with pytest.warns(UndefinedMetricWarning, match="(pearson|spearman) is undefined"):
        metrics = compute_metrics(("pearson", "spearman"), [0.1, 0.5, 0.9], [2.0, 2.0, 2.0])
    assert metrics == {"pearson": None, "spearman": None}
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics  # strict JSON
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)
        constant = compute_metrics(("pearson",), [0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert constant == {"pearson": 0.0}  # a constant prediction captures no relation
    with pytest.raises(MicrotuneError, match="must be finite"):
        compute_metrics(("pearson",), [0.5, math.nan, 0.1], [1.0, 2.0, 3.0])


def test_non_finite_outputs_are_not_scored(tiny_model_dirs):
    from microtune.backbone.load import load_backbone
    from microtune.model import HeadConfig, TaskModel
    from microtune.training.loop import evaluate

    backbone, tokenizer = load_backbone(str(tiny_model_dirs["bert"]))
    model = TaskModel(backbone, HeadConfig(num_labels=2, readout="mean"))
    with torch.no_grad():
        model.head.linear.bias.fill_(math.nan)
    rows = [tokenizer("a good film")]
    rows = [{k: list(v) for k, v in r.items()} for r in rows]
    with pytest.raises(MicrotuneError, match="not finite on 1 of 1 evaluation examples"):
        evaluate(model, get_task("sst2"), rows, [1], tokenizer.pad_token_id)


def test_the_export_check_fails_on_nan_and_large_differences():
    logits = np.array([[2.0, -3.0]])
    export.check_logit_diff(1e-6, logits, "float32", "out")
    for diff in (math.nan, math.inf, 0.1):
        with pytest.raises(MicrotuneError, match="export check failed") as caught:
            export.check_logit_diff(diff, logits, "float32", "out")
        assert "\n" not in str(caught.value)
    with pytest.raises(MicrotuneError, match="export check failed"):  # a NaN artifact
        export.check_logit_diff(math.nan, np.array([[math.nan, 1.0]]), "float32", "out")
