"""The command line: documented options, one-line errors, and a real kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from microtune.cli import build_parser, main
from microtune.methods import METHODS

from .conftest import error_lines


def error_of(capsys, argv):
    code = main(argv)
    lines = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith("microtune: error: ")
    return lines[0]


def test_train_help_documents_every_option():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    text = train.format_help()
    for flag in (
        "--task",
        "--method",
        "--output",
        "--model",
        "--data-dir",
        "--max-steps",
        "--epochs",
        "--seed",
        "--resume",
        "--readout",
        "--d",
        "--position",
        "--z-init",
        "--dropout",
    ):
        assert flag in text
    assert set(METHODS) <= set(train._option_string_actions["--method"].choices)


def test_info_lists_methods_tasks_and_architectures(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["methods"]["slash"]["mergeable"] is True
    assert {"bert", "roberta", "distilbert", "gpt2", "llama"} <= set(info["architectures"])
    assert info["tasks"]["stsb"]["num_labels"] == 1


def test_bad_input_is_a_one_line_error(capsys, tmp_path, data_dir):
    train = ["train", "--task", "sst2", "--output", str(tmp_path / "out")]
    err = error_of(capsys, [*train, "--data-dir", str(tmp_path)])
    assert "no 'train' split for sst2" in err and "--data-dir" in err
    train += ["--data-dir", str(data_dir)]
    err = error_of(capsys, [*train, "--position", "middle"])
    assert "position 'middle' unknown" in err
    err = error_of(capsys, [*train, "--model", str(tmp_path / "nowhere")])
    assert "could not load model" in err
    err = error_of(capsys, [*train, "--method", "slash", "--rank", "4"])
    assert err == "microtune: error: --rank does not apply to method 'slash'"
    err = error_of(capsys, ["eval", "--artifact", str(tmp_path)])
    assert "is not a microtune artifact" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_undiscoverable_architecture_says_what_was_not_found(capsys, tmp_path, data_dir):
    from transformers import T5Config, T5EncoderModel

    from .conftest import tiny_tokenizer

    T5EncoderModel(
        T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(tmp_path / "t5")
    tiny_tokenizer().save_pretrained(tmp_path / "t5")
    capsys.readouterr()  # drop save_pretrained's progress output
    err = error_of(
        capsys,
        [
            "train",
            "--task",
            "sst2",
            "--output",
            str(tmp_path / "o"),
            "--data-dir",
            str(data_dir),
            "--model",
            str(tmp_path / "t5"),
        ],
    )
    # An encoder-decoder has two block lists: discovery refuses, naming both and the fix.
    assert "'t5' is not in the architecture map" in err
    assert "encoder.block, decoder.block" in err
    assert "add an ArchSpec" in err


def _train_command(output, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "microtune",
        "train",
        "--task",
        "sst2",
        "--method",
        "slash",
        "--output",
        str(output),
        "--data-dir",
        str(data_dir),
        "--max-steps",
        "40",
        "--max-train-examples",
        "1500",
        "--checkpoint-every",
        "10",
        "--eval-every",
        "20",
        "--no-progress",
        "--seed",
        "7",
        *extra,
    ]


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        _train_command(tmp_path / "whole", data_dir), check=True, env=env, capture_output=True
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(killed, data_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = killed / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once it is past its second checkpoint
        if log.is_file() and any(
            json.loads(line).get("step", 0) >= 25 for line in log.read_text().splitlines() if line
        ):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (killed / "checkpoint.safetensors").is_file()
    assert not (killed / "metrics.json").exists()

    result = subprocess.run(
        _train_command(killed, data_dir, "--resume"), env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["metrics"] == whole["metrics"]
    a = load_file(tmp_path / "whole" / "adapter.safetensors")
    b = load_file(killed / "adapter.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("command", ["train", "eval", "merge", "export", "info", "plot"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: microtune " + command in capsys.readouterr().out


def test_more_bad_training_input_is_refused_before_work(capsys, tmp_path, data_dir):
    train = ["train", "--task", "sst2", "--data-dir", str(data_dir), "--output"]
    err = error_of(capsys, [*train, str(tmp_path / "a"), "--max-length", "100000"])
    assert "--max-length 100000 is out of range for this model; use 8 to 510" in err
    err = error_of(capsys, [*train, str(tmp_path / "a"), "--head-dropout", "2"])
    assert "--head-dropout must be in [0, 1)" in err
    err = error_of(capsys, [*train, str(tmp_path / "a"), "--max-train-examples", "0"])
    assert "--max-train-examples must be at least 1" in err
    (tmp_path / "file").write_text("x")
    err = error_of(capsys, [*train, str(tmp_path / "file")])
    assert "is a file; name a folder" in err
    err = error_of(capsys, [*train, str(tmp_path / "a"), "--train-file", str(tmp_path / "f")])
    assert "give --train-file and --dev-file together" in err
