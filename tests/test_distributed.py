"""Training past one process: real `torchrun` runs of the real command line (gloo, 2 processes)
on a tiny model, against one process; a killed rank; a resumed multi-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from microtune.backbone.load import load_backbone
from microtune.cli import main
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.training.config import TrainConfig
from microtune.training.distributed import World
from microtune.training.loop import Trainer

TIMEOUT_S = 240  # a whole launch, start-up included, on a busy 2-core machine
STEPS = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _train_args(model: Path, data: Path, output: Path, batch_size: int, *extra: str) -> list[str]:
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
        "--label-column",
        "label",
        "--model",
        str(model),
        "--method",
        "slash",
        "--output",
        str(output),
        "--batch-size",
        str(batch_size),
        "--max-steps",
        str(STEPS),
        "--checkpoint-every",
        "10",
        "--eval-every",
        "0",
        "--no-progress",
        "--seed",
        "3",
        *extra,
    ]


def _two_processes(args: list[str], log_dir: Path) -> subprocess.Popen:
    """torchrun as a user runs it, each rank's stdout/stderr into its own file under log_dir."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    launcher += ["--log-dir", str(log_dir), "--redirects", "3", "-m", "microtune"]
    return subprocess.Popen(
        [*launcher, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the run did not end within {TIMEOUT_S} s (a hang): {err[-2000:]}")
    return process.returncode, out, err


def _rank_output(log_dir: Path, rank: int, stream: str) -> str:
    (path,) = log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def _losses(folder: Path) -> list[float]:
    lines = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, toy_files, tmp_path_factory) -> dict:
    """Two processes with micro-batch 4 each and, meanwhile, one with 8 and one with two
    micro-batches of 4 (the same logical batch; in this process, as `python -m microtune`
    runs them, to save start-ups)."""
    root = tmp_path_factory.mktemp("distributed")
    model = tiny_model_dirs["bert"]
    two = _two_processes(_train_args(model, toy_files, root / "two", 4), root / "two-logs")
    assert main(_train_args(model, toy_files, root / "one", 8)) == 0
    accumulated = _train_args(model, toy_files, root / "accumulated", 4, "--grad-accum", "2")
    assert main(accumulated) == 0
    code, _, err = _finish(two)
    assert code == 0, err[-3000:]
    # The same two processes with activation checkpointing (z recomputed in every block).
    args = _train_args(model, toy_files, root / "two-ckpt", 4, "--gradient-checkpointing")
    code, _, err = _finish(_two_processes(args, root / "two-ckpt-logs"))
    assert code == 0, err[-3000:]
    return {"root": root, "model": model, "data": toy_files}


def test_two_processes_train_as_one(runs):
    root = runs["root"]
    one, two = (
        load_file(root / "one" / "adapter.safetensors"),
        load_file(root / "two" / "adapter.safetensors"),
    )
    assert one.keys() == two.keys()
    # One batch of 8 against two of 4: the CPU's kernels block an 8-row and a 4-row matmul
    # differently, so each step's gradient differs in the last bits, and AdamW's normalised
    # steps carry that over the run (1.4e-6 seen on an AMD EPYC); two micro-batches of 4 in one
    # process match two processes bit for bit (below).
    for name in one:
        gap = float((one[name] - two[name]).abs().max())
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), (name, gap)
    assert not torch.equal(one["method.z"], torch.zeros_like(one["method.z"]))  # it trained
    losses_one, losses_two = _losses(root / "one"), _losses(root / "two")
    assert len(losses_one) == len(losses_two) == STEPS // 10
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two, strict=True)) < 1e-6
    # Two processes cut the batch as one process's two micro-batches do: the same numbers.
    accumulated = load_file(root / "accumulated" / "adapter.safetensors")
    for name in two:
        assert torch.equal(accumulated[name], two[name]), name
    metrics = json.loads((root / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == STEPS


def _assert_same_run(a: Path, b: Path) -> None:
    """The same trained tensors and per-step losses, to 1e-6."""
    one, two = (load_file(folder / "adapter.safetensors") for folder in (a, b))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-6), name
    losses_a, losses_b = _losses(a), _losses(b)
    assert len(losses_a) == len(losses_b)
    assert max(abs(x - y) for x, y in zip(losses_a, losses_b, strict=True)) < 1e-6


def test_activation_checkpointing_recomputes_every_block_and_changes_no_number(tiny_model_dirs):
    """transformers recomputes a block only in training mode, and a frozen backbone without
    dropout is in eval mode: the trainer must still make the blocks recompute (counted)."""
    rows = [{"input_ids": [2, 5 + i, 9, 3], "attention_mask": [1, 1, 1, 1]} for i in range(8)]
    trained, calls = [], []
    folder = str(tiny_model_dirs["bert"])  # built (seeded) before the runs are seeded
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone, tokenizer = load_backbone(folder, "float32")
        method = build_method("slash", {"dropout": False})
        model = TaskModel(backbone, HeadConfig(num_labels=2), method)
        config = TrainConfig(
            max_steps=3,
            batch_size=4,
            learning_rate=1e-2,
            progress=False,
            gradient_checkpointing=checkpointing,
        )
        trainer = Trainer(model, config, rows, [0, 1] * 4, tokenizer.pad_token_id, "unused")
        count = [0]
        for block in backbone.encoder.layer:  # inside the checkpointed forward: runs twice
            block.intermediate.register_forward_hook(lambda *_, c=count: c.append(c.pop() + 1))
        trainer.train_mode()  # as `fit` does
        for _ in range(3):
            trainer.step_plugin(model, trainer._micro_batches(list(range(8))), 8)
        calls.append(count[0])
        trained.append(method.z.detach().clone())
        assert not backbone.encoder.layer[0].attention.training  # dropout stays off
    blocks = len(backbone.encoder.layer)
    assert calls == [3 * 2 * blocks, 3 * 2 * blocks * 2]  # 3 steps x 2 micro-batches
    assert torch.allclose(trained[0], trained[1], rtol=0, atol=1e-6)
    assert not torch.equal(trained[0], torch.zeros_like(trained[0]))


def test_two_processes_with_activation_checkpointing_train_as_without(runs):
    """SLaSh's z is used in every (recomputed) block: the non-reentrant checkpoint works
    across processes (the reentrant one fails there, peft#313)."""
    _assert_same_run(runs["root"] / "two", runs["root"] / "two-ckpt")


def test_checkpointing_across_processes_with_parameters_a_step_leaves_unused(runs):
    """Full fine-tuning with the mean read-out never uses BERT's pooler: its tensors get no
    gradient on any process, with checkpointing or without, and the runs still agree."""
    root = runs["root"]
    launches = []
    for name, extra in (("full", ()), ("full-ckpt", ("--gradient-checkpointing",))):
        args = _train_args(runs["model"], runs["data"], root / name, 4, *extra)
        args += ["--method", "full", "--max-steps", "20", "--lr", "1e-3"]
        launches.append(_two_processes(args, root / f"{name}-logs"))
    for launch in launches:
        code, _, err = _finish(launch)
        assert code == 0, err[-3000:]
    _assert_same_run(root / "full", root / "full-ckpt")


def test_checkpointing_refuses_a_step_that_trains_in_eval_mode(
    tiny_model_dirs, toy_files, tmp_path, capsys
):
    args = _train_args(tiny_model_dirs["bert"], toy_files, tmp_path / "dp", 8)
    args += ["--gradient-checkpointing", "--dp-epsilon", "8", "--dp-batch", "16"]
    code, err = main(args), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--gradient-checkpointing: this run's step trains in eval mode" in err


def test_accelerate_launch_trains_as_torchrun_does(runs):
    """`accelerate launch` sets the same environment; on a machine without GPUs its
    `--multi_gpu` launcher (torchrun's machinery) runs gloo processes all the same."""
    root = runs["root"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "--main_process_ip", "127.0.0.1"]
    launcher += ["--main_process_port", str(_free_port()), "-m", "microtune"]
    args = _train_args(runs["model"], runs["data"], root / "accelerate", 4)
    process = subprocess.Popen(
        [*launcher, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    code, out, err = _finish(process)
    assert code == 0, err[-3000:]
    assert json.loads(out)["processes"] == 2
    ours, torchrun = (load_file(root / n / "adapter.safetensors") for n in ("accelerate", "two"))
    for name in torchrun:
        assert torch.equal(ours[name], torchrun[name]), name


def test_rank_zero_alone_writes_and_prints(runs):
    root = runs["root"]
    names = sorted(os.listdir(root / "two"))
    assert names == ["adapter.safetensors", "metrics.json", "microtune.json", "train_log.jsonl"]
    lines = (root / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == STEPS // 10 + 1  # each step logged once, one eval
    logs = root / "two-logs"
    assert json.loads(_rank_output(logs, 0, "stdout"))["steps"] == STEPS  # one JSON object
    assert _rank_output(logs, 1, "stdout") == ""


def _kill_rank_one(launcher: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL the rank-1 worker once the run has written its first checkpoint."""
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint.is_file():
        assert launcher.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            os.kill(int(pid), signal.SIGKILL)
            return
    pytest.fail("no rank-1 worker found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank in /proc")
def test_a_killed_rank_stops_the_other_and_the_run_resumes_bit_for_bit(runs, capsys):
    root, logs = runs["root"], runs["root"] / "killed-logs"
    args = _train_args(runs["model"], runs["data"], root / "killed", 4)
    launcher = _two_processes(args, logs)
    _kill_rank_one(launcher, root / "killed" / "checkpoint.safetensors")
    code, _, _ = _finish(launcher)  # fails within the timeout: no hang
    assert code != 0
    # Rank 0 ends with one line (or silently, when torchrun's SIGTERM comes first).
    survivor = _rank_output(logs, 0, "stderr").strip()
    assert "Traceback" not in survivor and len(survivor.splitlines()) <= 1
    if survivor:
        assert survivor.startswith("microtune: error: training process 0 of 2 lost the others")
    assert not (root / "killed" / "adapter.safetensors").exists()
    # Its checkpoint belongs to two processes: one process may not continue it.
    capsys.readouterr()
    code, err = main([*args, "--resume"]), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "other settings (processes)" in err
    code, _, err = _finish(_two_processes([*args, "--resume"], root / "resumed-logs"))
    assert code == 0, err[-3000:]
    resumed, uninterrupted = (
        load_file(root / name / "adapter.safetensors") for name in ("killed", "two")
    )
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert _losses(root / "killed") == _losses(root / "two")


def _workers(launcher: subprocess.Popen) -> list[int]:
    """The launcher's worker processes (its children), by PID."""
    path = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def _alive(pid: int) -> bool:
    """Running: a zombie waiting for its reaper is dead once its last thread has gone (the
    leader turns zombie first, while the others still hold the process's files)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status or threads != [str(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_workers_die_with_a_killed_launcher_and_free_the_output(
    tiny_model_dirs, toy_files, tmp_path
):
    """SIGKILL to torchrun's whole process group (a closed terminal, a killed job): the workers,
    each in a session of its own, die with it within seconds instead of training on unseen with
    the output folder's lock held; nothing is published, and the folder is free again."""
    from filelock import FileLock

    output = tmp_path / "run"
    args = _train_args(tiny_model_dirs["bert"], toy_files, output, 4)
    args[args.index("--max-steps") + 1] = "1000000"  # far longer than the test waits
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    launcher += ["--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m", "microtune"]
    process = subprocess.Popen(
        [*launcher, *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell job's
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (output / "checkpoint.safetensors").is_file():  # both ranks are training
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _workers(process)
        assert len(workers) == 2
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their launcher"
        lock = FileLock(output / ".microtune.lock", timeout=10)
        lock.acquire()  # the folder is free: no orphan holds it
        lock.release()
        assert not (output / "adapter.safetensors").exists()
    finally:
        for pid in workers:  # without the fix: the orphans, ended here
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_plain_run_with_stale_launcher_variables_stops_soon_saying_what_to_unset(
    tiny_model_dirs, toy_files, tmp_path
):
    """WORLD_SIZE=2 RANK=0 left in the environment, no rank 1: one line within the join
    timeout (here 3 s), not the 30-minute collective timeout, and nothing written."""
    model = tiny_model_dirs["bert"]
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["MICROTUNE_DIST_JOIN_TIMEOUT_S"] = "3"
    args = _train_args(model, toy_files, tmp_path / "out", 4)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "microtune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 90  # start-up on a busy machine, plus 3 s
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "found no other process at 127.0.0.1:" in lines[0]
    assert "within 3 s" in lines[0] and "unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR" in lines[0]
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_world_reads_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    world = World.from_env()
    assert (world.rank, world.size, world.is_main) == (2, 4, False)
    assert world.shard(list(range(10))) == [6, 7]  # blocks of 3, 3, 2, 2
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MicrotuneError, match="RANK=4 and WORLD_SIZE=4 disagree"):
        World.from_env()
