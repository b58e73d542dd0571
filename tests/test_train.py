"""The trainer: determinism, crash and resume, atomic checkpoints, accumulation, schedule."""

import json
import math
import random

import datasets
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import microtune
from microtune import api
from microtune.common.files import CHECKPOINT_FILE, LOG_FILE
from microtune.errors import MicrotuneError
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig
from microtune.training.loop import Trainer
from microtune.training.steps import lr_schedule

from .conftest import WORDS


def run(tmp_path, toy_files, model_dir, name, resume=False, **config):
    settings = dict(
        max_steps=12,
        batch_size=8,
        checkpoint_every=4,
        eval_every=0,
        seed=3,
        progress=False,
        learning_rate=0.05,
    )
    settings.update(config)
    return api.train(
        "sst2",
        "slash",
        tmp_path / name,
        method_options={"d": 16},
        model=str(model_dir),
        data=DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        train_config=TrainConfig(**settings),
        existing="resume" if resume else "refuse",
    )


def run_until_crash(tmp_path, toy_files, model_dir, name, crash_step, **config):
    """Start a run whose optimizer raises at its `crash_step`-th step, as a crash would."""
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_step:
            raise RuntimeError("simulated crash")
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", crashing_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, toy_files, model_dir, name, **config)


def test_same_seed_same_result_and_other_seed_differs(tmp_path, toy_files, tiny_model_dirs):
    bert = tiny_model_dirs["bert"]
    first = run(tmp_path, toy_files, bert, "a")
    second = run(tmp_path, toy_files, bert, "b")
    third = run(tmp_path, toy_files, bert, "c", seed=4)
    tensors = [load_file(tmp_path / n / "adapter.safetensors") for n in "abc"]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert not torch.equal(tensors[0]["method.z"], tensors[2]["method.z"])
    assert first["metrics"] == second["metrics"]
    assert first["trainable_parameters"] == third["trainable_parameters"]


def test_head_learning_rate_moves_only_the_head_at_its_own_rate(
    tmp_path, toy_files, tiny_model_dirs
):
    # One step without warmup: Adam's first update moves every parameter with a gradient by
    # its group's rate (times the gradient's sign), from the same seeded start in both runs.
    bert = tiny_model_dirs["bert"]
    one_step = dict(max_steps=1, warmup_ratio=0.0, checkpoint_every=0)
    run(tmp_path, toy_files, bert, "same", **one_step)
    run(tmp_path, toy_files, bert, "apart", head_learning_rate=0.001, **one_step)
    same, apart = (load_file(tmp_path / n / "adapter.safetensors") for n in ("same", "apart"))
    assert torch.equal(same["method.z"], apart["method.z"])  # z's update: --lr's, unchanged
    heads = [k for k in same if k.startswith("head.")]
    assert heads
    for key in heads:
        moved = (same[key] - apart[key]).abs()  # 0.05 - 0.001 where the gradient is nonzero
        assert torch.allclose(moved[moved > 0], torch.tensor(0.049), rtol=1e-3), key
        assert (moved > 0).float().mean() > 0.9


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, toy_files, tiny_model_dirs):
    bert = tiny_model_dirs["bert"]
    reference = run(tmp_path, toy_files, bert, "whole", eval_every=4)

    run_until_crash(tmp_path, toy_files, bert, "crashed", 10, eval_every=4)
    folder = tmp_path / "crashed"
    assert (folder / CHECKPOINT_FILE).is_file()
    assert not (folder / "adapter.safetensors").exists()  # no artifact from a failed run
    assert not list(folder.glob("*.tmp"))

    resumed = run(tmp_path, toy_files, bert, "crashed", eval_every=4, resume=True)
    assert resumed["metrics"] == reference["metrics"]
    whole = load_file(tmp_path / "whole" / "adapter.safetensors")
    again = load_file(folder / "adapter.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert not (folder / CHECKPOINT_FILE).exists()  # removed once the artifact is written
    steps = [
        json.loads(line)["step"]
        for line in (folder / LOG_FILE).read_text().splitlines()
        if "loss" in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicated log lines


def test_a_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path, toy_files, tiny_model_dirs, monkeypatch
):
    import safetensors.torch  # what microtune.common.files writes tensor files with

    bert = tiny_model_dirs["bert"]
    real_save = safetensors.torch.save_file
    writes = {"n": 0}

    def failing_second_write(tensors, path, metadata=None):
        writes["n"] += 1
        if writes["n"] == 2:
            with open(path, "wb") as handle:
                handle.write(b"half")  # a torn write ...
            raise OSError("disk full")  # ... then the failure
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_second_write)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, toy_files, bert, "torn")
    folder = tmp_path / "torn"
    assert not list(folder.glob(".*tmp"))
    checkpoint = load_file(folder / CHECKPOINT_FILE)  # still the intact first checkpoint
    assert "method.z" in {k.removeprefix("model.") for k in checkpoint}


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dirs, tmp_path):
    from microtune.backbone.load import load_backbone
    from microtune.methods import build_method
    from microtune.model import HeadConfig, TaskModel

    from .conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    rng = random.Random(1)
    rows = [tokenizer(" ".join(rng.sample(WORDS, 4))) for _ in range(16)]
    rows = [{k: list(v) for k, v in r.items()} for r in rows]
    labels = [i % 2 for i in range(16)]
    results = []
    for batch_size, accum in ((16, 1), (8, 2), (4, 4)):
        torch.manual_seed(0)
        backbone, _ = load_backbone(str(tiny_model_dirs["bert"]))
        model = TaskModel(
            backbone, HeadConfig(num_labels=2, readout="mean"), build_method("slash", {"d": 16})
        )
        config = TrainConfig(
            learning_rate=0.05,
            max_steps=1,
            batch_size=batch_size,
            grad_accum=accum,
            warmup_ratio=0.0,
            progress=False,
            checkpoint_every=0,
            eval_every=0,
        )
        # Same examples in the same order: one logical batch of all 16.
        trainer = Trainer(
            model, config, rows, labels, tokenizer.pad_token_id, tmp_path, sampler=_InOrder()
        )
        trainer.fit()
        results.append(model.method.z.detach().clone())
    # Equal-size micro-batches: the mean of means is the mean.
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert torch.allclose(results[0], results[2], atol=1e-6)


class _InOrder:
    """A sampler whose every epoch is one logical batch of the 16 rows, in order."""

    batches_per_epoch = 1

    def epoch(self, epoch):
        return [list(range(16))]


def test_shuffled_sampler_cuts_the_seeded_epoch_order():
    from microtune.tasks.data import epoch_order
    from microtune.training.samplers import ShuffledSampler

    sampler = ShuffledSampler(num_examples=10, batch_size=4, seed=3)
    assert sampler.batches_per_epoch == 3
    assert sum(sampler.epoch(2), []) == epoch_order(10, 3, 2)
    assert [len(b) for b in sampler.epoch(0)] == [4, 4, 2]
    fixed = ShuffledSampler(num_examples=10, batch_size=4, seed=3, drop_last=True)
    assert [len(b) for b in fixed.epoch(0)] == [4, 4]


def test_length_grouped_sampler_pads_less_and_still_sees_every_example_once():
    from microtune.training.samplers import LengthGroupedSampler, ShuffledSampler

    rng = random.Random(0)
    lengths = tuple(rng.randint(3, 60) for _ in range(1000))
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=5, group_batches=10)
    batches = sampler.epoch(1)
    assert len(batches) == sampler.batches_per_epoch == 63
    assert sorted(sum(batches, [])) == list(range(1000))  # each example once per epoch
    assert batches == sampler.epoch(1) and batches != sampler.epoch(2)  # pure of (seed, epoch)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    shuffled = ShuffledSampler(1000, 16, seed=5).epoch(1)
    assert padded(batches) < 0.6 * padded(shuffled)
    # The batch order is shuffled, not sorted from long to short.
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True)


def test_warmup_then_linear_cosine_or_no_decay():
    factor = lr_schedule(warmup_steps=4, total_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5)
    assert factor(20) == 0.0
    # The linear decay stays the formula runs recorded before it had siblings: bit for bit.
    assert all(factor(s) == max(0.0, (20 - s) / 16) for s in range(4, 25))
    cosine = lr_schedule(warmup_steps=4, total_steps=20, name="cosine")
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(12) == pytest.approx(0.5) and cosine(20) == 0.0
    assert cosine(8) == pytest.approx((1 + math.cos(math.pi / 4)) / 2) and cosine(30) == 0.0
    constant = lr_schedule(warmup_steps=4, total_steps=20, name="constant")
    assert [constant(s) for s in (0, 3, 4, 19, 20)] == [0.25, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(MicrotuneError, match="--lr-schedule must be one of linear, cosine"):
        TrainConfig(max_steps=1, lr_schedule="step")


def test_training_length_is_required_and_validated():
    from microtune.errors import MicrotuneError

    with pytest.raises(MicrotuneError, match="--max-steps N or --epochs E"):
        TrainConfig()
    with pytest.raises(MicrotuneError, match="--lr must be positive"):
        TrainConfig(max_steps=1, learning_rate=0)
    assert TrainConfig(epochs=2, batch_size=8, grad_accum=2).total_steps(33) == 6


def test_resume_refuses_changed_settings_and_survives_a_torn_log_line(
    tmp_path, toy_files, tiny_model_dirs
):
    from microtune.errors import MicrotuneError

    bert = tiny_model_dirs["bert"]
    run_until_crash(tmp_path, toy_files, bert, "run", 6)
    with pytest.raises(MicrotuneError, match=r"other settings \(train_config.seed\)"):
        run(tmp_path, toy_files, bert, "run", resume=True, seed=5)
    with pytest.raises(MicrotuneError, match=r"other settings \(train_config.lr_schedule\)"):
        run(tmp_path, toy_files, bert, "run", resume=True, lr_schedule="cosine")
    with (tmp_path / "run" / LOG_FILE).open("a") as log:
        log.write('{"step": 7, "lo')  # what a kill in the middle of a write leaves
    resumed = run(tmp_path, toy_files, bert, "run", resume=True)
    assert resumed["steps"] == 12


def test_the_chosen_schedule_sets_the_rate_each_step(tmp_path, toy_files, tiny_model_dirs):
    # 12 steps, no warmup, logged every step with the rate the schedule has moved to.
    settings = dict(max_steps=12, warmup_ratio=0.0, log_every=1, checkpoint_every=0)
    peak, expected = 0.05, {}
    for name in ("linear", "cosine", "constant"):
        run(tmp_path, toy_files, tiny_model_dirs["bert"], name, lr_schedule=name, **settings)
        lines = (tmp_path / name / LOG_FILE).read_text().splitlines()
        expected[name] = [peak * lr_schedule(0, 12, name)(step) for step in range(1, 13)]
        logged = [json.loads(line)["lr"] for line in lines if '"loss"' in line]
        assert logged == pytest.approx(expected[name]), name
    assert expected["constant"][2] == peak > expected["cosine"][2] > expected["linear"][2]


def test_counters_must_not_be_negative():
    from microtune.errors import MicrotuneError

    with pytest.raises(MicrotuneError, match="--eval-every and --checkpoint-every must be >= 0"):
        TrainConfig(max_steps=1, eval_every=-1)


def test_eval_reads_your_files_with_the_columns_training_used(tmp_path, toy_files, tiny_model_dirs):
    for split in ("train", "dev"):
        rows = [
            json.loads(line)
            for line in (toy_files / f"{split}.jsonl").read_text().split("\n")
            if line
        ]
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["sentence"], "y": r["label"]}) + "\n" for r in rows)
        )
    report = api.train(
        "sst2",
        "slash",
        tmp_path / "art",
        method_options={"d": 16},
        model=str(tiny_model_dirs["bert"]),
        data=DataSource(
            train_file=str(tmp_path / "train.jsonl"),
            dev_file=str(tmp_path / "dev.jsonl"),
            text_columns=("text",),
            label_column="y",
        ),
        train_config=TrainConfig(max_steps=3, eval_every=0, progress=False),
    )
    again = api.evaluate_artifact(
        tmp_path / "art", data=DataSource(dev_file=str(tmp_path / "dev.jsonl"))
    )
    assert again == report["metrics"]


def test_train_reads_rows_in_memory_as_it_reads_the_same_rows_from_files(
    tmp_path, toy_files, tiny_model_dirs
):
    def rows(split):
        return [
            json.loads(line) for line in (toy_files / f"{split}.jsonl").read_text().splitlines()
        ]

    def train(name, data):
        return microtune.train(
            "sst2",
            "slash",
            tmp_path / name,
            method_options={"d": 16},
            model=str(tiny_model_dirs["bert"]),
            data=data,
            train_config=TrainConfig(max_steps=4, batch_size=8, eval_every=0, progress=False),
        )

    files = DataSource(
        train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
    )
    expected = train("files", files)["metrics"]
    given = {
        "dicts": (rows("train"), rows("dev")),
        "pandas": (pd.DataFrame(rows("train")), pd.DataFrame(rows("dev"))),
        "datasets": (
            datasets.Dataset.from_list(rows("train")),
            datasets.Dataset.from_list(rows("dev")),
        ),
    }
    for name, (train_rows, dev_rows) in given.items():
        report = train(name, DataSource(train_rows=train_rows, dev_rows=dev_rows))
        assert report["metrics"] == expected, name  # the same rows, the same run
    frame = pd.DataFrame(rows("train"))
    refusals = {
        "train_file takes a path, not a DataFrame; pass rows in memory": lambda: DataSource(
            train_file=frame, dev_file=frame
        ),
        "give train_file or train_rows, not both": lambda: DataSource(
            train_file="a.csv", train_rows=frame, dev_rows=frame
        ),
        "give --train-file and --dev-file together": lambda: DataSource(
            train_rows=frame
        ).check_for_training(),
        "train_rows takes rows in memory; pass a path as train_file": lambda: DataSource(
            train_rows="train.csv", dev_rows=frame
        ),
    }
    for message, build in refusals.items():
        with pytest.raises(MicrotuneError, match=message):
            build()
    for bad, message in (
        (7, "must be a list of dicts, a pandas DataFrame or a datasets.Dataset; got int"),
        ([{"sentence": "good", "label": 1}, ["good", 1]], "the train rows, row 2: not a mapping"),
    ):
        with pytest.raises(MicrotuneError, match=message):
            train("bad", DataSource(train_rows=bad, dev_rows=rows("dev")))
