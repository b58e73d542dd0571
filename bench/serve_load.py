"""Many tasks on one base: the mixed-batch engine and `microtune serve` under load (issue 18).

One SLaSh and one LoRA artifact are trained on SST-2 (MiniLM); the other tasks are copies with
their trained tensors perturbed (seeded) and saved as real artifacts: fine for speed and memory,
not for accuracy (exactness is tests/test_multitask.py's, on really trained artifacts).

    python bench/serve_load.py engine            # 32 SLaSh / 32 LoRA rows: ratios, peft
    python bench/serve_load.py server            # the trace against the server, every setup
    python bench/serve_load.py server --tasks 1 10 --requests 100   # smaller
    python bench/serve_load.py memory            # process memory of 1,000 SLaSh tasks

`engine` prints interleaved medians: a 32-row batch of 32 different tasks ÷ the same rows
through one merged model, and against peft's mixed-adapter batch (`adapter_names=`).
`server` runs a uvicorn server in this process on a free loopback port and an S-LoRA style
trace (task popularity by a power law, Poisson arrivals at --rate), bounded in requests and
seconds: throughput, p50/p90/p99 latency, errors; and resident bytes per task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

import microtune
from microtune import api
from microtune.artifacts.store import load_artifact, load_base, save_artifact
from microtune.backbone.options import ModelOptions
from microtune.export.peft import peft_config, peft_tensors
from microtune.serving.config import ServeConfig
from microtune.serving.http import create_app
from microtune.serving.multitask import load_many
from microtune.tasks.data import collate
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def trained(root: Path, method: str, options: dict) -> Path:
    folder = root / f"trained-{method}"
    if not (folder / "microtune.json").is_file():
        api.train(
            "sst2",
            method,
            folder,
            method_options=options,
            model=ModelOptions(device="cpu", max_length=64),
            data=DataSource(data_dir=str(DATA_DIR), max_train_examples=960),
            train_config=TrainConfig(max_steps=30, eval_every=0, progress=False),
        )
    return folder


def clones(root: Path, source: Path, prefix: str, count: int) -> list[Path]:
    """`count` artifacts: `source` with its tensors perturbed (seed = index), saved for real."""
    folders = [root / f"{prefix}-{i:04d}" for i in range(count)]
    missing = [f for f in folders if not (f / "microtune.json").is_file()]
    if not missing:
        return folders
    model, tokenizer, config = load_artifact(source)
    original = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
    parameters = dict(model.named_parameters())
    for folder in missing:
        generator = torch.Generator().manual_seed(int(folder.name.split("-")[-1]))
        with torch.no_grad():
            for name, tensor in original.items():
                noise = torch.randn(tensor.shape, generator=generator) * tensor.std() * 0.3
                parameters[name].copy_(tensor + noise)
        folder.mkdir(parents=True, exist_ok=True)
        save_artifact(
            folder,
            model,
            method_name=config["method"],
            base_model=config["base_model"]["name"],
            base_fingerprint=config["base_model"]["fingerprint"],
            task=config["task"],
            max_length=config["max_length"],
            tokenizer=tokenizer,
        )
    return folders


def sentences(count: int) -> list[str]:
    rows = (DATA_DIR / "glue" / "sst2" / "validation.jsonl").read_text().splitlines()
    return [json.loads(line)["sentence"] for line in rows[:count]]


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn (same load for each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times


def paired_ratio(times: dict[str, list[float]], slower: str, faster: str) -> float:
    """Median over rounds of faster/slower, each pair run back to back (robust to drifts
    in the machine's load)."""
    return statistics.median(f / s for f, s in zip(times[faster], times[slower], strict=True))


def merged_forward(folder: Path, texts: list[str]):
    """The same rows through one merged task model (collated as the engine collates)."""
    alone = microtune.load(folder).merge()
    model = alone.task_model
    examples = alone.examples(texts)
    rows, _ = model.encode(alone.tokenizer, examples, alone.config["max_length"])
    inputs = collate(rows, alone.tokenizer.pad_token_id)

    @torch.no_grad()
    def run():
        return model(**inputs)

    return run


def build_peft(folders: list[Path], model=None):
    """One peft model with the LoRA tasks as adapters named by their folders, on `model` (a
    whole `...ForCausalLM`, for `generate`) or else on the artifacts' own backbone."""
    shared = load_base(folders[0], None, torch.device("cpu"))  # read each artifact onto it
    first = load_artifact(folders[0], base_model=shared)[0]
    settings = peft_config(first.method, first.backbone, "base")
    fields = LoraConfig.__dataclass_fields__
    lora = LoraConfig(**{k: v for k, v in settings.items() if k in fields and k != "peft_type"})
    if model is None:
        own = load_artifact(folders[0])[0]  # peft's own copy of the base, without our hooks
        own.method.detach()
        model = own.backbone

    peft_model = None
    for folder in folders:
        method = load_artifact(folder, base_model=shared)[0].method
        method.detach()
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=folder.name)
        else:
            peft_model.add_adapter(folder.name, lora)
        set_peft_model_state_dict(peft_model, peft_tensors(method), adapter_name=folder.name)
    return peft_model.eval()


@torch.no_grad()
def peft_rows(engine, peft_model, rows: list, names: list[str], mixed: bool) -> list:
    """Logits of rows (task per row) through peft: one mixed-adapter batch (`adapter_names=`),
    or one forward per task with that adapter set (swapping adapters), with the same heads."""
    groups = [list(range(len(rows)))] if mixed else []
    if not mixed:
        for name in dict.fromkeys(names):
            groups.append([i for i, n in enumerate(names) if n == name])
    found = [None] * len(rows)
    for group in groups:
        inputs = collate([rows[i] for i in group], engine.base.tokenizer.pad_token_id)
        if mixed:
            hidden = peft_model(**inputs, adapter_names=[names[i] for i in group])
        else:
            peft_model.set_adapter(names[group[0]])
            hidden = peft_model(**inputs)
        hidden = hidden.last_hidden_state
        for position, i in enumerate(group):
            task = engine.tasks[names[i]]
            found[i] = engine.heads.head_outputs([task], hidden, None, inputs, [position])[0]
    return found


def peft_forward(engine, peft_model, folders: list[Path], texts: list[str]):
    """peft's mixed-adapter batch of the same LoRA tasks and rows, plus the same heads."""
    encoded = [engine.encode(f.name, [t]) for f, t in zip(folders, texts, strict=True)]
    rows = [e.rows[0] for e in encoded]
    names = [f.name for f in folders]
    return lambda: peft_rows(engine, peft_model, rows, names, mixed=True)


def served_by_peft(engine, peft_model, mixed: bool):
    """The engine's `run` replaced by peft's (mixed batch or one adapter at a time), so the
    same server, batcher and heads serve peft's LoRA."""

    def run(encoded):
        rows = [(r, row) for r, e in enumerate(encoded) for row in e.rows]
        names = [encoded[r].task for r, _ in rows]
        found = peft_rows(engine, peft_model, [row for _, row in rows], names, mixed)
        outputs = [[] for _ in encoded]
        for (r, _), logits in zip(rows, found, strict=True):
            outputs[r].append(logits.float().numpy())
        return [np.stack(o) for o in outputs]

    engine.run = run
    return engine


def engine_bench(args, root: Path) -> dict:
    texts = sentences(32)
    results = {}
    for method, options in (("slash", {}), ("lora", {})):
        folders = clones(root, trained(root, method, options), method, 32)
        engine = load_many(folders)
        encoded = [engine.encode(f.name, [t]) for f, t in zip(folders, texts, strict=True)]
        fns = {
            "mixed": lambda e=engine, x=encoded: e.run(x),
            "merged": merged_forward(folders[0], texts),
        }
        if method == "lora":
            fns["peft"] = peft_forward(engine, build_peft(folders), folders, texts)
            ours = torch.cat([torch.from_numpy(o) for o in fns["mixed"]()])
            theirs = torch.stack(fns["peft"]())
            print(json.dumps({"max_abs_diff_mixed_vs_peft": float((ours - theirs).abs().max())}))
        medians, times = interleaved(fns, args.repeats)
        row = {f"{k}_ms": round(v * 1000, 2) for k, v in medians.items()}
        row["mixed_throughput_vs_merged"] = round(medians["merged"] / medians["mixed"], 3)
        row["paired_mixed_vs_merged"] = round(paired_ratio(times, "mixed", "merged"), 3)
        if "peft" in medians:
            row["mixed_speedup_vs_peft"] = round(medians["peft"] / medians["mixed"], 3)
            row["paired_mixed_vs_peft"] = round(paired_ratio(times, "mixed", "peft"), 3)
        results[f"{method}_32_tasks"] = row
        print(json.dumps({f"{method}_32_tasks": row}), flush=True)
    return results


@contextlib.contextmanager
def live_server(engine, config: ServeConfig):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


async def trace(url: str, names: list[str], args, round_: int) -> dict:
    """Poisson arrivals at args.rate, task i drawn with weight 1/(i+1)^alpha; bounded."""
    rng = random.Random(args.seed * 1000 + round_)  # the same trace for every setup
    weights = [1 / (i + 1) ** args.alpha for i in range(len(names))]
    texts = sentences(200)
    latencies: list[float] = []
    errors = 0

    async def one(client, task, text):
        nonlocal errors
        start = time.perf_counter()
        try:
            response = await client.post("/v1/predict", json={"task": task, "inputs": [text]})
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - start)
        else:
            errors += 1

    limits = httpx.Limits(max_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=args.seconds, limits=limits) as client:
        start = time.perf_counter()
        pending = []
        for _ in range(args.requests):
            task = rng.choices(names, weights)[0]
            pending.append(asyncio.create_task(one(client, task, rng.choice(texts))))
            await asyncio.sleep(rng.expovariate(args.rate))
            if time.perf_counter() - start > args.seconds:
                break
        await asyncio.wait_for(asyncio.gather(*pending), args.seconds)
        elapsed = time.perf_counter() - start
    return {"ok": len(latencies), "errors": errors, "seconds": elapsed, "latencies": latencies}


def summary(runs: list[dict]) -> dict:
    """Median throughput over the rounds; latency quantiles over every request of them."""
    ordered = sorted(x for run in runs for x in run["latencies"])

    def quantile(q):
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {
        "ok": sum(run["ok"] for run in runs),
        "errors": sum(run["errors"] for run in runs),
        "throughput_rps": round(statistics.median(r["ok"] / r["seconds"] for r in runs), 2),
        "p50_ms": quantile(0.5),
        "p90_ms": quantile(0.9),
        "p99_ms": quantile(0.99),
    }


def engines(args, root: Path) -> dict:
    """label -> engine of every setup: (a) one merged model, (b) N SLaSh tasks, (c) N LoRA,
    (d) the same LoRA tasks in peft's mixed-adapter batches, (e) one peft adapter at a time."""
    slash = clones(root, trained(root, "slash", {}), "slash", max(args.tasks))
    first = slash[0]
    merged = load_many({"merged": first}, max_copy_bytes=2**30)
    merged.remove("merged")
    merged.add(first, "merged", copy=True)  # the task as one merged model, no per-row hooks
    found = {"merged_1": merged}
    for n in args.tasks:
        found[f"slash_{n}"] = load_many(slash[:n])
    if args.lora_tasks:
        lora = clones(root, trained(root, "lora", {}), "lora", args.lora_tasks)
        found[f"lora_{args.lora_tasks}"] = load_many(lora)
        peft_model = build_peft(lora)
        found[f"peft_mixed_{args.lora_tasks}"] = served_by_peft(load_many(lora), peft_model, True)
        found[f"peft_swap_{args.lora_tasks}"] = served_by_peft(load_many(lora), peft_model, False)
    return found


def server_bench(args, root: Path) -> dict:
    """Every setup behind its own live server; the traces run round-robin (interleaved)."""
    config = ServeConfig(port=0, max_queue=100_000, max_batch_size=32, max_wait_ms=args.wait_ms)
    built = engines(args, root)
    runs: dict[str, list[dict]] = {label: [] for label in built}
    with contextlib.ExitStack() as stack:
        urls = {label: stack.enter_context(live_server(e, config)) for label, e in built.items()}
        for round_ in range(args.rounds):
            for label, url in urls.items():
                run = asyncio.run(trace(url, list(built[label].tasks), args, round_))
                runs[label].append(run)
                print(label, round_, run["ok"], round(run["seconds"], 2), flush=True)
    results = {}
    for label, engine in built.items():
        row = summary(runs[label])
        sizes = engine.resident_bytes()
        row["tasks"] = len(sizes)
        row["resident_bytes_per_task"] = round(sum(sizes.values()) / len(sizes))
        row["artifact_tensor_bytes_per_task"] = round(
            sum(t.artifact_bytes for t in engine.tasks.values()) / len(sizes)
        )
        row["resident_bytes_all_tasks"] = sum(sizes.values())
        row["base_bytes"] = engine.base_bytes()
        row["throughput_vs_merged"] = round(
            row["throughput_rps"] / summary(runs["merged_1"])["throughput_rps"], 3
        )
        results[label] = row
    return results


def resident_set() -> int:
    """This process's resident memory in bytes (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def grown_by_tasks(folders: list[Path]):
    """Load the first artifact, then add the rest: the engine, the process's growth in bytes
    over the adds, and the added tasks."""
    engine = load_many(folders[:1])
    gc.collect()
    before = resident_set()
    for folder in folders[1:]:
        engine.add(folder)
    gc.collect()
    return engine, resident_set() - before, list(engine.tasks.values())[1:]


def memory_bench(args, root: Path) -> dict:
    """Process memory of N SLaSh tasks on one base, beside what the engine accounts."""
    slash = clones(root, trained(root, "slash", {}), "slash", max(args.tasks))
    engine, grown, tasks = grown_by_tasks(slash)
    return {
        "tasks_added": len(tasks),
        "rss_growth_per_task": round(grown / len(tasks)),
        "accounted_bytes_per_task": round(sum(t.resident_bytes for t in tasks) / len(tasks)),
        "artifact_tensor_bytes_per_task": tasks[0].artifact_bytes,
        "base_bytes": engine.base_bytes(),
        "all_tasks_bytes_with_base": engine.base_bytes() + sum(engine.resident_bytes().values()),
        "merged_copies_bytes": len(engine.tasks) * engine.base_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("engine", "server", "memory"))
    parser.add_argument("--root", default="/tmp/microtune-serve-bench", help="artifacts here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--lora-tasks", type=int, default=100)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=400.0, help="requests per second offered")
    parser.add_argument("--alpha", type=float, default=1.0, help="power law of task popularity")
    parser.add_argument("--seconds", type=float, default=120.0, help="bound of one trace")
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="traces per setup, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    bench = {"engine": engine_bench, "server": server_bench, "memory": memory_bench}[args.what]
    result = bench(args, root)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
