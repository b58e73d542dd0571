"""Many tenants of one decoder: `microtune serve`'s OpenAI routes under a generation trace
(issue 31), on the packaged SmolLM2-135M.

The tenants are SLaSh and LoRA tasks on SmolLM2 whose tensors are seeded random moves off
their start, saved as real artifacts: fine for speed and memory, not for quality (exactness is
tests/test_openai_server.py's). Every number is measured in this one run, setups interleaved
round by round, so they compare as ratios on whatever CPU runs it.

    python bench/serve_generate.py exact      # every tenant's greedy text = its own generate
    python bench/serve_generate.py trace      # the server: tokens/s, TTFT, TBT per setup
    python bench/serve_generate.py batch      # one mixed batch: ours vs peft vs swapping
    python bench/serve_generate.py blocking   # p99 TTFT behind a long generation
    python bench/serve_generate.py memory     # resident bytes per SLaSh tenant

`trace`: a uvicorn server in this process on a free loopback port, called by the `openai`
client (streaming) with Poisson arrivals, task popularity by a power law, prompts of 16-256
tokens and outputs of 8-128 (bounded in requests and seconds): (a) one merged task, (b) 1, 10,
100 and 1,000 SLaSh tasks resident, (c) 10 LoRA tasks. `batch`: the same 10 LoRA tasks' rows
as one batch: our decoder, peft's `generate(adapter_names=...)`, and one merged copy swapped per
request. `blocking`: short requests arriving while a long one decodes, with and without
continuous batching.

Measured on this project's 2-core CPU (docs/results.md, JSON in bench/results/serve_generate/):
100 SLaSh tenants 0.968 of one merged task's tokens/s, 1,000 tenants 0.982, 10 LoRA tenants
0.907 (trace); in one batch, ours 0.891 of the merged model against peft's 0.209 and swapping
0.761; p99 time to first token behind a long generation 2.06 s continuous, 48.0 s static;
69,120 bytes per SLaSh tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_peft, clones, grown_by_tasks, live_server  # noqa: E402

import microtune  # noqa: E402
from microtune.artifacts.store import load_artifact, save_artifact  # noqa: E402
from microtune.backbone.load import fingerprint, load_backbone  # noqa: E402
from microtune.methods import build_method  # noqa: E402
from microtune.model import HeadConfig, TaskModel  # noqa: E402
from microtune.serving.config import ServeConfig  # noqa: E402
from microtune.serving.decoding import Decoder, Generation  # noqa: E402
from microtune.serving.multitask import load_many  # noqa: E402
from microtune.tasks.examples import task_record  # noqa: E402
from microtune.tasks.spec import get_task  # noqa: E402
from microtune.tasks.types import get_task_type  # noqa: E402

MODEL = "smollm2"
CAUSAL = get_task_type("causal-lm")
WORDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "train.jsonl"


def source_artifact(root: Path, method: str, options: dict | None = None) -> Path:
    """One SmolLM2 artifact of `method`, its tensors moved off their start (seeded)."""
    folder = root / f"source-{method}"
    if (folder / "microtune.json").is_file():
        return folder
    backbone, tokenizer = load_backbone(MODEL, "float32", CAUSAL.auto_class)
    base_fingerprint = fingerprint(backbone)
    torch.manual_seed(0)
    method_ = build_method(method, options)
    model = TaskModel(backbone, HeadConfig(1, "tokens"), method_, task_type=CAUSAL)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    task = CAUSAL.fit_rows(get_task("causal-lm"), [{"prompt": "a", "response": "b"}], None)
    save_artifact(folder, model, method_name=method, base_model=MODEL,
                  base_fingerprint=base_fingerprint, task=task_record(task), max_length=512,
                  tokenizer=tokenizer)  # fmt: skip
    return folder


def prompts(count: int, seed: int, tokenizer) -> list[tuple[str, int]]:
    """(prompt of 16-256 tokens, output length 8-128), seeded: SST-2 sentences joined."""
    rng = random.Random(seed)
    lines = [json.loads(x)["sentence"] for x in WORDS.read_text().splitlines()[:4000]]
    items = []
    for _ in range(count):
        want = int(16 * 16 ** rng.random())  # log-uniform 16..256
        text = ""
        while len(tokenizer(text).input_ids) < want:
            text += rng.choice(lines) + " "
        ids = tokenizer(text).input_ids[:want]
        items.append((tokenizer.decode(ids), int(8 * 16 ** rng.random())))  # 8..128
    return items


async def trace(url: str, names: list[str], items, args, round_: int) -> dict:
    """Poisson arrivals at args.rate; task i drawn with weight 1/(i+1)^alpha; streamed."""
    rng = random.Random(args.seed * 1000 + round_)  # the same trace for every setup
    weights = [1 / (i + 1) ** args.alpha for i in range(len(names))]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                timeout=args.seconds)  # fmt: skip
    first, between, tokens, errors = [], [], 0, 0

    async def one(task: str, prompt: str, length: int) -> None:
        nonlocal tokens, errors
        start = last = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=task, prompt=prompt, max_tokens=length, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    (between if last > start else first).append(now - last)
                    last = now
                if chunk.usage is not None:  # the last event: the tokens really decoded
                    tokens += chunk.usage.completion_tokens
        except openai.OpenAIError:
            errors += 1

    start = time.perf_counter()
    pending = []
    for prompt, length in items:
        task = rng.choices(names, weights)[0]
        pending.append(asyncio.create_task(one(task, prompt, length)))
        await asyncio.sleep(rng.expovariate(args.rate))
    await asyncio.wait_for(asyncio.gather(*pending), args.seconds)
    await client.close()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "first": first, "between": between,
            "errors": errors}  # fmt: skip


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def summary(runs: list[dict]) -> dict:
    first = [x for run in runs for x in run["first"]]
    between = [x for run in runs for x in run["between"]]
    return {
        "tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in runs), 2),
        "ttft_p50_ms": quantile(first, 0.5),
        "ttft_p99_ms": quantile(first, 0.99),
        "tbt_p50_ms": quantile(between, 0.5),
        "tbt_p99_ms": quantile(between, 0.99),
        "errors": sum(r["errors"] for r in runs),
    }


def setups(args, root: Path) -> dict:
    """name -> (engine, the task names a trace draws from)."""
    slash = clones(root, source_artifact(root, "slash"), "slash", max(args.tasks))
    lora = clones(root, source_artifact(root, "lora"), "lora", 10)
    merged = load_many(slash[:1], max_copy_bytes=1 << 32)
    merged.remove(slash[0].name)
    merged.add(slash[0], copy=True)  # its own merged copy of the base: no hooks at all
    built = {"a: one merged task": (merged, [slash[0].name])}
    for count in args.tasks:
        engine = load_many(slash[:count])
        built[f"b: {count} SLaSh tasks"] = (engine, list(engine.tasks))
    engine = load_many(lora)
    built["c: 10 LoRA tasks"] = (engine, list(engine.tasks))
    return built


def trace_bench(args, root: Path) -> dict:
    built = setups(args, root)
    tokenizer = next(iter(built.values()))[0].base.tokenizer
    items = prompts(args.requests, args.seed, tokenizer)
    config = ServeConfig(max_batch_size=args.rows, max_new_tokens=128)
    runs: dict[str, list[dict]] = {name: [] for name in built}
    for round_ in range(args.rounds):
        for name, (engine, names) in built.items():
            with live_server(engine, config) as url:
                runs[name].append(asyncio.run(trace(url, names, items, args, round_)))
            print(f"round {round_}: {name}: {runs[name][-1]['tokens']} tokens", flush=True)
    result = {name: summary(r) for name, r in runs.items()}
    merged = result["a: one merged task"]["tokens_per_s"]
    for name in result:
        result[name]["vs_merged"] = round(result[name]["tokens_per_s"] / merged, 3)
    if args.plot:
        plot_trace(result, Path(args.plot))
    return result


def plot_trace(result: dict, path: Path) -> None:
    """Output tokens/s against resident SLaSh tenants, beside one merged task and 10 LoRA
    tenants: the picture of the trace (docs/guides/many-tasks.md)."""
    import matplotlib  # the bench extra; only this picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(n.split()[1]) for n in result if n.startswith("b: ")]
    rates = [result[f"b: {n} SLaSh tasks"]["tokens_per_s"] for n in counts]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot(counts, rates, "o-", label="SLaSh tenants, one shared decoder")
    merged = result["a: one merged task"]["tokens_per_s"]
    axes.axhline(merged, color="grey", linestyle="--", label="one merged task")
    axes.plot([10], [result["c: 10 LoRA tasks"]["tokens_per_s"]], "s", label="10 LoRA tenants")
    axes.set(xscale="log", xlabel="tenants resident", ylabel="output tokens / s",
             title="microtune serve: SmolLM2-135M, the same trace",
             ylim=(0, 1.2 * max([*rates, merged])))  # fmt: skip
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def decode_all(engine, rows: list[Generation], max_rows: int, continuous=True) -> float:
    """Seconds for our decoder to finish these rows, submitted at once (EOS ignored, so that
    every setup makes the same tokens)."""
    decoder = Decoder(engine, max_rows, continuous=continuous)
    decoder.eos = None
    start = time.perf_counter()
    for row in rows:
        decoder.submit(row)
    while not all(row.done for row in rows):
        time.sleep(0.002)
    decoder.close()
    return time.perf_counter() - start


@torch.no_grad()
def peft_generate(peft_model, tokenizer, batch: list[tuple[str, list[int], int]]) -> int:
    """peft's mixed-adapter generation of the batch (left-padded, greedy); tokens made."""
    width = max(len(ids) for _, ids, _ in batch)
    ids = torch.tensor([[0] * (width - len(i)) + i for _, i, _ in batch])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for _, i, _ in batch])
    out = peft_model.generate(
        input_ids=ids, attention_mask=mask, adapter_names=[name for name, _, _ in batch],
        max_new_tokens=max(n for *_, n in batch), do_sample=False,
        eos_token_id=None, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return sum(min(n, out.shape[1] - width) for *_, n in batch)


@torch.no_grad()
def swapped_copy(merged_engine, sources: dict, batch) -> int:
    """One merged copy, each request alone: its task's weights written in, then decoded."""
    tokens = 0
    task = next(iter(merged_engine.tasks.values()))
    state = task.tuned.task_model.backbone.state_dict()
    for name, ids, length in batch:
        for key, value in sources[name].items():
            state[key].copy_(value)
        row = Generation(task, ids, length)
        decode_all(merged_engine, [row], 1)
        tokens += len(row.tokens)
    return tokens


def exact_bench(args, root: Path) -> dict:
    """SLaSh, BitFit, LoRA and PaFi tenants and the bare base in one decoder, every row
    greedy: does each row's text equal its own artifact's `microtune generate`?"""
    methods = {
        "slash": None,
        "bitfit": {"create_missing_biases": True},
        "lora": None,
        "pafi": None,
    }  # fmt: skip  (HiWi bias needs FFN biases: Llama has none)
    folders = {m: source_artifact(root, m, o) for m, o in methods.items()}
    engine = load_many(folders)
    tokenizer = engine.base.tokenizer
    texts = [p for p, _ in prompts(args.rows, args.seed, tokenizer)]
    rows = [(m, t, Generation(engine.tasks[m] if m else None, tokenizer(t).input_ids, 24))
            for m in [*folders, None] for t in texts]  # fmt: skip
    steps: list[int] = []
    decoder = Decoder(engine, len(rows))
    decoder.observer.step = steps.append
    for *_, row in rows:
        decoder.submit(row)
    while not all(row.done for *_, row in rows):
        time.sleep(0.01)
    decoder.close()
    own = {m: {r["prompt"]: r["response"] for r in microtune.load(f).generate(texts, 24)}
           for m, f in folders.items()}  # fmt: skip
    model, _ = load_backbone(MODEL, "float32", CAUSAL.auto_class)
    own[None] = {t: base_greedy(model, tokenizer, t, 24) for t in texts}
    same = {str(m): sum(row.text == own[m][t] for n, t, row in rows if n == m) for m in own}
    return {"rows": len(rows), "rows_per_step_max": max(steps), "equal_rows": same,
            "of": len(texts)}  # fmt: skip


def base_greedy(model, tokenizer, text: str, tokens: int) -> str:
    """transformers' own greedy `generate` of the bare base."""
    ids = torch.tensor([tokenizer(text).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The body tensors a LoRA task's merge changes, merged (what swapping writes in)."""
    model = load_artifact(folder)[0]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.method.merge(model.backbone, model.arch)
    after = model.backbone.state_dict()
    return {k: after[k].clone() for k in before if not torch.equal(before[k], after[k])}


def batch_bench(args, root: Path) -> dict:
    """10 LoRA tasks' rows as one batch, interleaved repeats: output tokens/s of our decoder,
    peft's mixed-adapter `generate`, one merged copy swapped per request, and the single merged
    model decoding the same rows (the ceiling). EOS is ignored so every setup makes the same
    tokens."""
    lora = clones(root, source_artifact(root, "lora"), "lora", 10)
    ours = load_many(lora)
    single = load_many(lora[:1], max_copy_bytes=1 << 32)
    single.remove(lora[0].name)
    single.add(lora[0], name="merged", copy=True)
    tokenizer = ours.base.tokenizer
    items = prompts(args.rows, args.seed, tokenizer)
    names = [lora[i % len(lora)].name for i in range(len(items))]
    batch = [(n, tokenizer(p).input_ids, k) for n, (p, k) in zip(names, items, strict=True)]
    sources = {folder.name: merged_weights(folder) for folder in lora}
    peft_model = build_peft(lora, load_backbone(MODEL, "float32", CAUSAL.auto_class)[0]).eval()
    wanted = sum(k for *_, k in batch)

    def rows(engine, same: str | None = None) -> list[Generation]:
        return [Generation(engine.tasks[same or n], ids, k) for n, ids, k in batch]

    runs = {
        "ours: 10 LoRA tasks, one batch": lambda: decode_all(ours, rows(ours), args.rows, True),
        "single merged model, same rows": lambda: decode_all(single, rows(single, "merged"),
                                                            args.rows, True),
        "peft generate(adapter_names=...)": lambda: timed(peft_generate, peft_model, tokenizer,
                                                          batch),
        "one merged copy swapped per request": lambda: timed(swapped_copy, single, sources, batch),
    }  # fmt: skip
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(run())
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    result = {n: round(wanted / statistics.median(s), 2) for n, s in seconds.items()}
    ceiling = result["single merged model, same rows"]
    return {
        "rows": len(batch),
        "output_tokens": wanted,
        "tokens_per_s": result,
        "vs_single_merged": {n: round(v / ceiling, 3) for n, v in result.items()},
    }


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def blocking_bench(args, root: Path) -> dict:
    """A long generation (a 256-token prompt, 512 new tokens) in flight; short requests (8
    tokens) arrive at Poisson times: their time to first token, continuous batching or not."""
    engine = load_many(clones(root, source_artifact(root, "slash"), "slash", 1))
    task = next(iter(engine.tasks.values()))
    tokenizer = engine.base.tokenizer
    long_prompt = tokenizer(prompts(1, args.seed + 7, tokenizer)[0][0]).input_ids
    shorts = [tokenizer(p).input_ids for p, _ in prompts(args.requests, args.seed, tokenizer)]
    result = {}
    for _ in range(args.rounds):
        for continuous in (True, False):
            decoder = Decoder(engine, args.rows, continuous=continuous)
            decoder.eos = None
            long = Generation(task, long_prompt, 512)
            decoder.submit(long)
            rng = random.Random(args.seed)
            rows = []
            while not long.tokens:
                time.sleep(0.01)
            for ids in shorts:
                rows.append(Generation(task, ids, 8))
                decoder.submit(rows[-1])
                time.sleep(rng.expovariate(args.rate))
            while not all(r.done for r in rows):
                time.sleep(0.01)
            decoder.close()
            key = "continuous" if continuous else "static (no joining)"
            result.setdefault(key, []).extend(r.first_token_s for r in rows)
    return {
        key: {"ttft_p50_ms": quantile(v, 0.5), "ttft_p99_ms": quantile(v, 0.99), "n": len(v)}
        for key, v in result.items()
    }


def memory_bench(args, root: Path) -> dict:
    """Bytes per SLaSh tenant of the decoder (accounted and process growth) against as many
    merged copies of the base."""
    slash = clones(root, source_artifact(root, "slash"), "slash", max(args.tasks))
    engine, grown, tasks = grown_by_tasks(slash)
    count = len(engine.tasks)
    return {
        "tenants": count,
        "accounted_bytes_per_tenant": round(sum(t.resident_bytes for t in tasks) / len(tasks)),
        "rss_growth_per_tenant": round(grown / len(tasks)),
        "artifact_tensor_bytes_per_tenant": tasks[0].artifact_bytes,
        "base_bytes": engine.base_bytes(),
        "all_tenants_with_base": engine.base_bytes() + sum(engine.resident_bytes().values()),
        "merged_copies": count * engine.base_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("exact", "trace", "batch", "blocking", "memory"))
    parser.add_argument("--root", default="/tmp/microtune-generate-bench", help="artifacts here")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--requests", type=int, default=32, help="requests per trace")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second offered")
    parser.add_argument("--alpha", type=float, default=1.0, help="power law of task popularity")
    parser.add_argument("--seconds", type=float, default=600.0, help="bound of one trace")
    parser.add_argument("--rows", type=int, default=16, help="rows per decoding step at most")
    parser.add_argument("--rounds", type=int, default=3, help="repeats per setup, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", help="trace: draw tokens/s against tenants to this PNG")
    parser.add_argument("--replot", help="trace: redraw --plot from this earlier JSON output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.replot:  # the picture of an earlier run, without running it again
        plot_trace(json.loads(Path(args.replot).read_text()), Path(args.plot))
        return
    benches = {"exact": exact_bench, "trace": trace_bench, "batch": batch_bench,
               "blocking": blocking_bench, "memory": memory_bench}  # fmt: skip
    bench = benches[args.what]
    print(json.dumps(bench(args, root), indent=2))


if __name__ == "__main__":
    main()
