"""Re-run every bullet of issue 23's "What was seen" through the real command line.

Each case runs `python -m microtune` in a subprocess (bounded by a timeout: a hang shows as
"timeout") on a tiny random BERT or GPT-2 and toy files in a temporary folder, and the script
prints one Markdown table: the bullet, the exit code, the first stderr line, the time taken and
whether every file of the case's folder is byte-identical afterwards. Then the hostile table's
count by kind (tests/test_hostile.py).

    python bench/hostile_round2.py            # the table of bullets
    python bench/hostile_round2.py --suite    # and the hostile table's counts and run time
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
TIMEOUT = 60

from tests.conftest import WORDS, make_tiny_model  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="hostile-round2-"))
POSITIVE = {"good", "great", "fun", "best", "love"}


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def microtune(
    args: str | list[str], cwd: Path, stdin: bytes | None = None
) -> tuple[str, str, float]:
    """(exit code or "timeout", first stderr line, seconds)."""
    start = time.perf_counter()
    argv = args.split() if isinstance(args, str) else args
    try:
        done = subprocess.run(
            [sys.executable, "-m", "microtune", *argv],
            cwd=cwd,
            env=ENV,
            input=stdin,
            capture_output=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"still running after {TIMEOUT} s (killed)", TIMEOUT
    err = done.stderr.decode(errors="replace").strip().splitlines()
    return str(done.returncode), (err[0] if err else ""), time.perf_counter() - start


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 5)
        rows.append({"text": " ".join(words), "label": int(bool(POSITIVE & set(words)))})
    return rows


def setup() -> dict[str, Path]:
    """Tiny BERT and GPT-2, toy data, a trained sst2 artifact and a causal-lm one."""
    from tests.test_causal_lm import make_causal_model

    base = make_tiny_model("bert", ROOT / "base")
    gpt2 = make_causal_model("gpt2", ROOT / "gpt2", tie=True)
    data = ROOT / "data"
    for split, name in (("train", "train"), ("dev", "validation")):
        folder = data / "glue" / "sst2"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [
            {"sentence": r["text"], "label": r["label"]}
            for r in toy_rows(96 if split == "train" else 32)
        ]
        jsonl(folder / f"{name}.jsonl", rows)
    jsonl(ROOT / "toy.jsonl", toy_rows(96))
    jsonl(ROOT / "pairs.jsonl", [{"prompt": "the film is", "response": "good fun"}] * 8)
    common = "--method slash --d 8 --max-steps 2 --eval-every 0 --no-progress --batch-size 8"
    for args in (
        f"train --task sst2 --model {base} --data-dir {data} {common} --output {ROOT / 'artifact'}",
        f"train --task causal-lm --model {gpt2} --train-file {ROOT / 'pairs.jsonl'} --dev-file "
        f"{ROOT / 'pairs.jsonl'} --max-length 8 {common} --output {ROOT / 'causal'}",
    ):
        code, err, _ = microtune(args, ROOT)
        assert code == "0", err
    return {
        "base": base,
        "gpt2": gpt2,
        "data": data,
        "artifact": ROOT / "artifact",
        "causal": ROOT / "causal",
    }


def copy(src: Path, folder: Path, name: str) -> Path:
    return Path(shutil.copytree(src, folder / name))


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _pickled(folder: Path, src: dict) -> Path:
    import torch
    from safetensors.torch import load_file

    model = copy(src["base"], folder, "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def _wide(folder: Path, src: dict) -> Path:
    model = copy(src["base"], folder, "wide")
    edit_json(model / "config.json", lambda c: c.update(hidden_size=2 * c["hidden_size"]))
    return model


def _user_csv(folder: Path, setup: dict, text: str) -> str:
    """`train` of a classification task on this CSV text (train and dev), on the tiny base."""
    (folder / "t.csv").write_text(text)
    return (
        f"train --task classification --model {setup['base']} --train-file {folder}/t.csv "
        f"--dev-file {folder}/t.csv --text-columns text --label-column category {COMMON} "
        f"--output {folder}/out"
    )


def _stsb(folder: Path, setup: dict, label: str) -> str:
    stsb = folder / "data" / "glue" / "stsb"
    stsb.mkdir(parents=True)
    good = json.dumps({"sentence1": "a film", "sentence2": "the movie", "label": 1.0})
    bad = f'{{"sentence1": "a film", "sentence2": "bad", "label": {label}}}'
    (stsb / "train.jsonl").write_text("\n".join([good] * 7 + [bad]) + "\n")
    (stsb / "validation.jsonl").write_text(good + "\n")
    data = f"--data-dir {folder}/data"
    return f"train --task stsb --model {setup['base']} {data} {COMMON} --output {folder}/out"


def _long(folder: Path) -> Path:
    return jsonl(folder / "long.jsonl", [{"prompt": "the film is " * 6, "response": "good"}] * 4)


def _resume(folder: Path, src: dict) -> str:
    data = copy(src["data"], folder, "data")
    train = (
        f"train --task sst2 --model {{base}} --data-dir {data} --method slash --d 8 --max-steps 4 "
        f"--checkpoint-every 2 --eval-every 0 --no-progress --batch-size 8 --output {folder}/run"
    )
    stall = (  # stop the first run after step 2's checkpoint, as Ctrl-C would
        "import sys, torch; real = torch.optim.AdamW.step; calls = [0]\n"
        "def step(self, *a, **k):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3: raise KeyboardInterrupt\n"
        "    return real(self, *a, **k)\n"
        "torch.optim.AdamW.step = step\n"
        "from microtune.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = train.format(base=src["base"]).split()
    subprocess.run([sys.executable, "-c", stall, *argv], env=ENV, capture_output=True, timeout=300)
    file = data / "glue" / "sst2" / "train.jsonl"
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    jsonl(file, [{**row, "label": 1 - row["label"]} for row in lines])  # same count, other rows
    return train + " --resume"


def _artifact_edit(folder: Path, src: dict, change) -> Path:
    artifact = copy(src["artifact"], folder, "artifact")
    edit_json(artifact / "microtune.json", change)
    return artifact


def _seed_edited(c: dict) -> None:
    c["method_config"]["projection_seed"] = 1
    del c["config_sha256"]


def _stsb_head(c: dict) -> None:
    from microtune.artifacts.store import config_sha256

    c["task"]["name"] = "stsb"
    c["config_sha256"] = config_sha256(c)


BENCH = 'tasks = ["sst2"]\nseeds = [0]\n[[methods]]\nmethod = "slash"\n'

ACCOUNTANT = "accountant --sample-rate 0.01 --delta 1e-5"
COMMON = "--method slash --d 8 --max-steps 2 --eval-every 0 --no-progress --batch-size 8"
BINARY = b"\xff\xfe\x00caf\xe9 \x80\n"


def _train(folder: Path, src: dict, extra: str, model: Path | None = None) -> str:
    return (
        f"train --task sst2 --model {model or src['base']} --data-dir {src['data']} {COMMON} "
        f"--output {folder}/out {extra}"
    )


# (the bullet, a function of (case folder, sources) -> (arguments, cwd, stdin))
CASES = [
    (
        "train --dp-epsilon 1e300 --dp-batch 16",
        lambda f, s: (_train(f, s, "--dp-epsilon 1e300 --dp-batch 16"), f, None),
    ),
    ("accountant --sigma inf", lambda f, s: (f"{ACCOUNTANT} --sigma inf --steps 100", f, None)),
    (
        "accountant --epsilon 1e300",
        lambda f, s: (f"{ACCOUNTANT} --epsilon 1e300 --steps 100", f, None),
    ),
    (
        "train --dp-delta 0.5",
        lambda f, s: (_train(f, s, "--dp-epsilon 8 --dp-delta 0.5 --dp-batch 16"), f, None),
    ),
    ("accountant --sigma 1e-6", lambda f, s: (f"{ACCOUNTANT} --sigma 1e-6 --steps 100", f, None)),
    (
        "accountant --steps 1e12",
        lambda f, s: (f"{ACCOUNTANT} --sigma 1 --steps 1000000000000", f, None),
    ),
    ("accountant --epochs inf", lambda f, s: (f"{ACCOUNTANT} --sigma 1 --epochs inf", f, None)),
    ("config hidden size 2x the weights'", lambda f, s: (_train(f, s, "", _wide(f, s)), f, None)),
    ("pickle-only folder: train", lambda f, s: (_train(f, s, "", _pickled(f, s)), f, None)),
    (
        "pickle-only folder: eval --model",
        lambda f, s: (
            f"eval --artifact {s['artifact']} --data-dir {s['data']} --model {_pickled(f, s)}",
            f,
            None,
        ),
    ),
    ("pickle-only folder: inspect", lambda f, s: (f"inspect --model {_pickled(f, s)}", f, None)),
    ("predict, binary stdin", lambda f, s: (f"predict --artifact {s['artifact']}", f, BINARY)),
    ("generate, binary stdin", lambda f, s: (f"generate --artifact {s['causal']}", f, BINARY)),
    (
        "generate --prompt ''",
        lambda f, s: ([*f"generate --artifact {s['causal']} --prompt".split(), ""], f, None),
    ),
    ("stsb label 99", lambda f, s: (_stsb(f, s, "99"), f, None)),
    ("stsb label -7", lambda f, s: (_stsb(f, s, "-7"), f, None)),
    (
        "classification, every text empty",
        lambda f, s: (_user_csv(f, s, "text,category\n,a\n ,b\n,a\n,b\n"), f, None),
    ),
    (
        "CSV header repeated mid-file",
        lambda f, s: (
            _user_csv(f, s, "text,category\ngood film,a\nbad film,b\ntext,category\nfun,a\n"),
            f,
            None,
        ),
    ),
    (
        "causal-lm: every prompt > --max-length (train)",
        lambda f, s: (
            _causal_train(f, s),
            f,
            None,
        ),
    ),
    (
        "causal-lm: every dev prompt too long (eval)",
        lambda f, s: (f"eval --artifact {s['causal']} --data-file {_long(f)}", f, None),
    ),
    ("accountant --epsilon inf", lambda f, s: (f"{ACCOUNTANT} --epsilon inf --steps 100", f, None)),
    (
        "info: stsb with a two-label head",
        lambda f, s: (f"info --artifact {_artifact_edit(f, s, _stsb_head)}", f, None),
    ),
    (
        "CSV with two columns named category",
        lambda f, s: (
            _user_csv(f, s, "text,category,category\ngood film,a,b\nbad film,b,a\n"),
            f,
            None,
        ),
    ),
    (
        "train --resume on changed rows, same count",
        lambda f, s: (_resume(f, s).format(base=s["base"]), f, None),
    ),
    (
        "projection_seed edited, config_sha256 deleted (predict)",
        lambda f, s: (
            f"predict --artifact {_artifact_edit(f, s, _seed_edited)} --input {_inputs(f)}",
            f,
            None,
        ),
    ),
    (
        "bench run --output DIR holding the user's bench.json",
        lambda f, s: (_bench(f, s, "") + f" --output {_user_dir(f, 'bench.json')}", f, None),
    ),
    (
        "cd work && merge --output . --overwrite",
        lambda f, s: (
            f"merge --artifact {s['artifact']} --output . --overwrite",
            _user_dir(f, "notes.txt"),
            None,
        ),
    ),
    ("bench run, name with ../", lambda f, s: (_bench(f, s, 'name = "../escape"\n'), f, None)),
]


def _causal_train(folder: Path, src: dict) -> str:
    files = f"--train-file {_long(folder)} --dev-file {folder}/long.jsonl"
    return (
        f"train --task causal-lm --model {src['gpt2']} {files} --max-length 8 {COMMON} "
        f"--output {folder}/out"
    )


def _inputs(folder: Path) -> Path:
    (folder / "inputs.txt").write_text("the film is good\n")
    return folder / "inputs.txt"


def _user_dir(folder: Path, name: str) -> Path:
    work = folder / "work"
    work.mkdir()
    (work / name).write_text('{"mine": 1}\n')
    return work


def _bench(folder: Path, src: dict, head: str) -> str:
    (folder / "one.toml").write_text(head + BENCH)
    return f"bench run {folder}/one.toml --model {src['base']} --data-dir {src['data']}"


def run_cases() -> None:
    sources = setup()
    print("| what was seen | exit | first stderr line | seconds | files unchanged |")
    print("|---|---|---|---|---|")
    for number, (bullet, build) in enumerate(CASES):
        folder = ROOT / f"case{number}"
        folder.mkdir()
        args, cwd, stdin = build(folder, sources)
        before = snapshot(folder)
        code, line, seconds = microtune(args, cwd, stdin)
        same = "yes" if snapshot(folder) == before else "NO"
        line = line.replace("|", "\\|")
        print(f"| {bullet} | {code} | {line} | {seconds:.1f} | {same} |", flush=True)


def run_suite() -> None:
    """The hostile table: its count by kind, and its whole run time (pytest, one process)."""
    from tests.test_hostile import KINDS, counts_by_kind

    counts = counts_by_kind()
    print("\n| kind | cases |\n|---|---|")
    for kind, count in counts.items():
        print(f"| {KINDS[kind]} | {count} |")
    print(f"| total | {sum(counts.values())} |")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hostile.py"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    print(f"\ntests/test_hostile.py: {summary} (wall {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    try:
        if "--suite-only" not in sys.argv:
            run_cases()
        if "--suite" in sys.argv or "--suite-only" in sys.argv:
            run_suite()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
