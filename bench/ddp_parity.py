"""Two training processes against one: parity, differential privacy, bytes, throughput.

On the packaged MiniLM and a slice of real SST-2, trains SLaSh, LoRA, PaFi and full fine-tuning
(dropout off) once in one process with micro-batch B and once under `torchrun
--nproc-per-node 2` (gloo, one thread each) with micro-batch B/2, the same seed and logical
batch, and prints:

- the largest per-step loss difference and the largest difference of any final trainable
  number, per method (goal: <= 1e-6), and the latter against one process that cuts B into
  two micro-batches of B/2 as the two processes do (the same sums: expect 0 without DP);
- where the gap to one process x B comes from: the same two differences between one process
  x B and one process x 2 micro-batches of B/2 (no distribution at all). When two processes
  equal the cut run exactly, the gap is the float32 rounding of summing a batch in two
  halves, and the distributed code adds no error of its own;
- the same with DP-SGD (`dp_epsilon=8`, Poisson batches, a fixed noise seed): σ and ε of both
  runs, and the variance over noise seeds of SLaSh's update (final minus initial z), two
  processes ÷ one (noise added once: 1.0; added on each rank it would be 2.0);
- bytes all-reduced per optimizer step, per method;
- throughput (steps per second) of 2 processes x 1 thread ÷ 1 process x 2 threads, medians of
  launches alternated in rounds. Two cores can show parity, not a speed-up.

    python bench/ddp_parity.py [--steps 8] [--batch 16] [--seeds 6] [--rounds 3]

The script is also its own worker (`--worker`), launched plain or under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MICROTUNE_DATA_DIR", REPO.parent / "shared" / "data"))
METHODS = {  # dropout off everywhere, so that the runs are deterministic functions of the seed
    "slash": {"dropout": False},
    "lora": {"dropout": False, "lora_dropout": 0.0},
    "pafi": {"dropout": False},
    "full": {"dropout": False},
}


# -- the worker: one process of a run ---------------------------------------------------------


def _recorder(torch, record: dict, keep: Path | None):
    from microtune.training.callbacks import TrainerCallback

    class Recorder(TrainerCallback):
        """Per-step losses and times, bytes all-reduced, the update; rank 0 saves tensors."""

        def on_train_begin(self, trainer) -> None:
            self.start = {n: p.detach().clone() for n, p in trainer.parameters.items()}
            record.update(losses=[], step_s=[])

        def on_step_begin(self, trainer) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, trainer, logs) -> None:
            record["step_s"].append(time.perf_counter() - self.t0)
            record["losses"].append(logs["loss"])

        def on_train_end(self, trainer) -> None:
            from safetensors.torch import save_file

            world = trainer.step_plugin.world
            record["bytes_per_step"] = world.bytes_reduced / max(1, trainer.step)
            record["numel"] = sum(p.numel() for p in trainer.parameters.values())
            if keep is not None and world.is_main:
                final = {n: p.detach().contiguous() for n, p in trainer.parameters.items()}
                update = {f"update.{n}": final[n] - self.start[n] for n in final}
                save_file({**final, **update}, str(keep))

    return Recorder()


def _train(args, job: dict, out: Path) -> dict:
    import torch

    from microtune.api import train
    from microtune.backbone.options import ModelOptions
    from microtune.privacy.config import DPConfig
    from microtune.tasks.spec import DataSource
    from microtune.training.config import TrainConfig

    record: dict = {"job": job}
    config = TrainConfig(
        batch_size=job["micro_batch"],
        grad_accum=job.get("grad_accum", 1),
        max_steps=job["steps"],
        seed=0,
        log_every=1,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
        warmup_ratio=0.0,
    )
    privacy = None
    if job.get("dp_seed") is not None:
        privacy = DPConfig(epsilon=8.0, batch=job["logical"], noise_seed=job["dp_seed"])
    report = train(
        "sst2",
        job["method"],
        out / job["name"],
        method_options=METHODS[job["method"]],
        train_config=config,
        model=ModelOptions(max_length=64),
        data=DataSource(data_dir=str(args.data)),
        privacy=privacy,
        plugins=[_recorder(torch, record, out / f"{job['name']}.safetensors")],
        existing="overwrite",
    )
    if report is not None and "privacy" in report:
        record["sigma"] = report["privacy"]["sigma"]
        record["epsilon"] = report["privacy"]["epsilon"]
    return record


def worker(args) -> None:
    import torch

    from microtune.training.distributed import World

    torch.set_num_threads(args.threads)
    world = World.from_env()
    world.start(torch.device("cpu"))  # one group for every job of this launch
    jobs = json.loads(Path(args.jobs).read_text())
    out = Path(args.out)
    records = [_train(args, job, out) for job in jobs]
    if world.is_main:
        (out / "records.json").write_text(json.dumps(records))
    world.stop()


# -- the driver ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, jobs: list[dict], out: Path, processes: int, threads: int) -> list[dict]:
    """Run the jobs in one launch of `processes` workers; rank 0's records."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "jobs.json").write_text(json.dumps(jobs))
    own = [__file__, "--worker", "--jobs", str(out / "jobs.json"), "--out", str(out)]
    own += ["--threads", str(threads), "--data", str(args.data)]
    if processes == 1:
        command = [sys.executable, *own]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
        command += [str(processes), "--master-addr", "127.0.0.1"]
        command += ["--master-port", str(_free_port()), *own]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "records.json").read_text())


def _slice(root: Path, examples: int) -> Path:
    """SST-2's first `examples` training rows and 64 dev rows, as a data folder."""
    folder = root / "data" / "glue" / "sst2"
    folder.mkdir(parents=True)
    for split, size in (("train", examples), ("validation", 64)):
        with open(DATA / "glue" / "sst2" / f"{split}.jsonl") as handle:
            rows = [next(handle) for _ in range(size)]
        (folder / f"{split}.jsonl").write_text("".join(rows))
    return root / "data"


def _max_diff(a: Path, b: Path, prefix: str = "") -> float:
    from safetensors.torch import load_file

    one, two = load_file(str(a)), load_file(str(b))
    keys = [k for k in one if k.startswith("update.") == (prefix == "update.")]
    return max(float((one[k] - two[k]).abs().max()) for k in keys)


def parity(args, root: Path) -> dict:
    """Every method, plain and private, one process against two; DP update variance."""
    half = args.batch // 2
    jobs = []
    for method in METHODS:
        jobs.append({"name": method, "method": method, "steps": args.steps})
        jobs.append({"name": f"{method}-dp", "method": method, "steps": args.steps, "dp_seed": 0})
    jobs += [
        {"name": f"slash-dp-seed{s}", "method": "slash", "steps": 3, "dp_seed": 100 + s}
        for s in range(args.seeds)
    ]
    for job in jobs:
        job["logical"] = args.batch * 4 if "dp_seed" in job else args.batch
    one = launch(args, [{**j, "micro_batch": args.batch} for j in jobs], root / "one", 1, 1)
    # One process cutting B into two micro-batches of B/2 (DP: its micro-batches of B/2).
    cut = [{**j, "micro_batch": half, "grad_accum": 1 if "dp_seed" in j else 2} for j in jobs]
    cut_records = launch(args, cut, root / "cut", 1, 1)
    two = launch(args, [{**j, "micro_batch": half} for j in jobs], root / "two", 2, 1)
    return {"jobs": jobs, "one": one, "two": two, "cut": cut_records}


def _variance(folder: Path, names: list[str]) -> float:
    import torch
    from safetensors.torch import load_file

    updates = torch.stack(
        [load_file(str(folder / f"{n}.safetensors"))["update.method.z"] for n in names]
    )
    return float(updates.var(dim=0).mean())


def report_parity(root: Path, result: dict) -> None:
    one, two = result["one"], result["two"]
    print("\nparity: 2 processes x micro-batch B/2 (gloo, 1 thread) vs 1 process x B")
    print(
        f"{'run':>10} {'steps':>5} {'max |loss diff|':>16} {'max |tensor diff|':>18} "
        f"{'vs 1p 2x(B/2)':>14} {'bytes/step':>12} {'numbers':>10}  sigma (1p / 2p)  "
        "epsilon (1p / 2p)"
    )
    for a, b in zip(one, two, strict=True):
        name = a["job"]["name"]
        if "seed" in name:
            continue
        loss = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
        mine = root / "two" / f"{name}.safetensors"
        tensor = _max_diff(root / "one" / f"{name}.safetensors", mine)
        cut = _max_diff(root / "cut" / f"{name}.safetensors", mine)
        dp = ""
        if "sigma" in a:
            dp = f"  {a['sigma']:.6f} / {b['sigma']:.6f}  {a['epsilon']:.6f} / {b['epsilon']:.6f}"
        print(
            f"{name:>10} {len(a['losses']):>5} {loss:>16.2e} {tensor:>18.2e} {cut:>14.2e} "
            f"{b['bytes_per_step']:>12,.0f} {b['numel']:>10,}{dp}"
        )
    report_gap_source(root, result)
    seeds = [r["job"]["name"] for r in one if "seed" in r["job"]["name"]]
    var_one, var_two = _variance(root / "one", seeds), _variance(root / "two", seeds)
    print(
        f"\nDP-SLaSh update (z after 3 steps - z before) over {len(seeds)} noise seeds: "
        f"mean per-coordinate variance 1p {var_one:.4e}, 2p {var_two:.4e}, "
        f"ratio 2p/1p {var_two / var_one:.6f} (noise added once: 1)"
    )


def report_gap_source(root: Path, result: dict) -> None:
    """The gap of 2 processes to 1 process x B, next to 1 process x B against 1 process x 2
    micro-batches of B/2: equal gaps (and 2p == cut) mean the distribution adds no error."""
    print(
        "\nwhere the gap comes from (max |diff| of final trainable numbers / of per-step losses):"
    )
    print(f"{'run':>10} {'1p B vs 2p B/2':>22} {'1p B vs 1p 2x(B/2)':>22} {'2p vs 1p 2x(B/2)':>22}")
    rows = zip(result["one"], result["two"], result["cut"], strict=True)
    for one, two, cut in rows:
        name = one["job"]["name"]
        if "seed" in name:
            continue
        files = {k: root / k / f"{name}.safetensors" for k in ("one", "two", "cut")}
        pairs = [(files["one"], files["two"]), (files["one"], files["cut"])]
        pairs.append((files["two"], files["cut"]))
        losses = [(one, two), (one, cut), (two, cut)]
        cells = [
            f"{_max_diff(*files_pair):.2e} / {_max_loss_diff(*records):.2e}"
            for files_pair, records in zip(pairs, losses, strict=True)
        ]
        print(f"{name:>10} " + " ".join(f"{cell:>22}" for cell in cells))


def _max_loss_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))


def throughput(args, root: Path) -> None:
    """Steps per second of SLaSh, 2 processes x 1 thread vs 1 process x 2 threads (and 1 x 1
    for reference), launches alternated in rounds; the first 5 steps (warm-up) left out."""
    job = {"name": "speed", "method": "slash", "steps": args.speed_steps, "logical": 32}
    layouts = {"2p x 1t": (2, 1), "1p x 2t": (1, 2), "1p x 1t": (1, 1)}
    rates: dict[str, list[float]] = {label: [] for label in layouts}
    for round_ in range(args.rounds):
        for label, (processes, threads) in layouts.items():
            jobs = [{**job, "micro_batch": 32 // processes}]
            folder = root / f"speed-{round_}-{processes}-{threads}"
            (record,) = launch(args, jobs, folder, processes, threads)
            rates[label].append(1 / statistics.median(record["step_s"][5:]))
    medians = {label: statistics.median(values) for label, values in rates.items()}
    print(f"\nthroughput, SLaSh, logical batch 32, {args.rounds} rounds (steps/s, median):")
    for label, values in rates.items():
        print(f"  {label}: {medians[label]:.3f}  {[round(v, 3) for v in values]}")
    print(f"ratio 2p x 1t / 1p x 2t: {medians['2p x 1t'] / medians['1p x 2t']:.3f}")
    print("(2 shared cores: parity, not a speed-up, is what this machine can show)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8, help="steps per parity run")
    parser.add_argument("--batch", type=int, default=16, help="logical batch B (DP: 4B)")
    parser.add_argument("--seeds", type=int, default=6, help="noise seeds for the variance")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--speed-steps", type=int, default=40, help="steps per speed launch")
    parser.add_argument("--train-examples", type=int, default=1024)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.data = _slice(root, args.train_examples)
        started = time.time()
        report_parity(root, parity(args, root))
        if not args.skip_speed:
            throughput(args, root)
        print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
