"""`microtune plot`: a run's training curve as a PNG, from its train_log.jsonl."""

import json

import pytest
from matplotlib.image import imread

from microtune import api
from microtune.cli import main
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig
from microtune.training.log import read_train_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dirs, toy_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plot") / "run"
    api.train(
        "sst2",
        "slash",
        folder,
        model=str(tiny_model_dirs["bert"]),
        data=DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        train_config=TrainConfig(
            max_steps=4, batch_size=8, log_every=1, eval_every=2, progress=False
        ),
    )
    return folder


def plot(capsys, *argv):
    code = main(["plot", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err.strip()


def test_the_log_is_read_back_as_the_trainer_wrote_it(run_dir):
    curve = read_train_log(run_dir)
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert curve.steps == [1, 2, 3, 4]
    assert curve.losses == [line["loss"] for line in lines if "loss" in line]
    assert curve.eval_steps == [2, 4]
    assert curve.metrics == {
        "accuracy": [line["eval"]["accuracy"] for line in lines if "eval" in line]
    }


def test_a_run_with_dev_metrics_plots_two_panels(run_dir, tmp_path, capsys):
    code, result, _ = plot(capsys, "--run", str(run_dir))
    assert code == 0
    assert result == {
        "plot": str(run_dir / "training_curve.png"),
        "panels": 2,
        "metric": "accuracy",
        "last_step": 4,
    }
    assert (run_dir / "training_curve.png").read_bytes()[:8] == PNG_MAGIC
    # Without dev lines, one panel: a shorter picture of the same width.
    loss_only = tmp_path / "loss-only"
    loss_only.mkdir()
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    text = "".join(line + "\n" for line in lines if "eval" not in line)
    (loss_only / "train_log.jsonl").write_text(text)
    code, result, _ = plot(capsys, "--run", str(loss_only), "--output", str(tmp_path / "a.png"))
    assert code == 0 and result["panels"] == 1 and result["metric"] is None
    two, one = imread(run_dir / "training_curve.png"), imread(tmp_path / "a.png")
    assert one.shape[0] < 0.7 * two.shape[0] and abs(one.shape[1] - two.shape[1]) < 20


def test_a_folder_without_a_log_or_metric_is_a_one_line_error(run_dir, tmp_path, capsys):
    code, _, err = plot(capsys, "--run", str(tmp_path))
    assert code == 2
    assert err == (
        f"microtune: error: {tmp_path} has no train_log.jsonl; "
        "give the --output folder of `microtune train`"
    )
    code, _, err = plot(capsys, "--run", str(run_dir), "--metric", "f1")
    assert code == 2 and "\n" not in err
    assert err.endswith("the log records no dev metric 'f1'; it has: accuracy")
    (tmp_path / "train_log.jsonl").write_text('{"round": 1}\n')
    code, _, err = plot(capsys, "--run", str(tmp_path))
    assert code == 2 and "line 1: not a training log line" in err and "\n" not in err
