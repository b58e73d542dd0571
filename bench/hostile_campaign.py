"""Re-run every sub-case of issue 12's "What was seen" through the real command line.

Each case runs `python -m microtune` in a subprocess on a tiny random BERT and toy data in a
temporary folder, and the script prints one Markdown table: the case, what the issue saw before
(traceback, silent-wrong, data loss, outside read), and now: the exit code, the first stderr
line, and whether every user file (data, artifact, base model, the user's files in --output)
is byte-identical afterwards. Then the number of cases of tests/test_hostile.py by kind.

A full disk and a read-only folder are real when this process may mount a tmpfs (root in a
container); otherwise the full disk is simulated in process and the read-only folder is
reported as not run. Ctrl-C at start-up is delivered as a real SIGINT at a chosen import.

    python bench/hostile_campaign.py
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}

from tests.conftest import WORDS, make_tiny_model  # noqa: E402
from tests.test_hostile import KINDS, SIGINT_SCRIPT, counts_by_kind  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="hostile-campaign-"))
BASE = ROOT / "base"
DATA = ROOT / "data"
ARTIFACT = ROOT / "artifact"
rows: list[tuple[str, str, str, str, str, str]] = []
# The case being run: its watched folders, their snapshot (taken by `ready`, i.e. after the
# case has damaged its own copies, right before microtune starts) and notes for the table.
current: dict = {}


# -- helpers ------------------------------------------------------------------------------------


def snapshot(*folders: Path) -> dict[str, str]:
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            found[str(path)] = (
                "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


def ready() -> None:
    """Snapshot the user's files now, right before the first microtune process starts."""
    if "watched" in current and "start" not in current:
        current["start"] = snapshot(*current["watched"])


def microtune(*args: str, cwd: Path = ROOT, timeout: int = 300) -> tuple[int, str, str]:
    ready()
    done = subprocess.run(
        [sys.executable, "-m", "microtune", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def first_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if not lines:
        return "(none)"
    text = lines[0].replace(str(ROOT), "…").replace("|", "\\|")
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return (text[:150] + "…" if len(text) > 150 else text) + more


def case(
    name: str,
    before: str,
    run: Callable[[Path], tuple[int, str, str]],
    watch: Callable[[Path], list[Path]] = lambda folder: [],
    note: Callable[[Path, int, str, str], str] | None = None,
) -> None:
    """Run one case in a folder of its own; record its row."""
    folder = ROOT / f"case{len(rows):02d}"
    folder.mkdir()
    shutil.copytree(ARTIFACT, folder / "artifact")
    shutil.copytree(DATA, folder / "data")
    current.clear()
    current["watched"] = [BASE, folder / "artifact", folder / "data", *watch(folder)]
    code, out, err = run(folder)
    unchanged = "yes" if snapshot(*current["watched"]) == current["start"] else "**no**"
    extra = note(folder, code, out, err) if note else current.get("note", "")
    rows.append((name, before, str(code), first_line(err), unchanged, extra))


def train_args(folder: Path, *extra: str, task: str = "sst2", method: str = "slash") -> list:
    args = ["train", "--task", task, "--method", method, "--model", BASE, "--data-dir"]
    args += [folder / "data", "--batch-size", "8", "--eval-every", "0", "--no-progress"]
    if method == "slash":
        args += ["--d", "8"]
    if "--epochs" not in extra:
        args += ["--max-steps", "2"]
    if "--output" not in extra:
        args += ["--output", folder / "out"]
    return [*args, *extra]


def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "artifact" / "microtune.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "artifact" / "adapter.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def forge(config: dict) -> None:  # both hashes updated, as a careful forger would
        from microtune.artifacts.store import config_sha256

        config["tensors_sha256"] = f"sha256:{digest}"
        config["config_sha256"] = config_sha256(config)

    edit_config(folder, forge)


def stsb(folder: Path, label: str, dev_label: str = "2.5") -> None:
    """STS-B training rows, the last labelled `label` as written in the JSON line."""
    glue = folder / "data" / "glue" / "stsb"
    glue.mkdir(parents=True)
    line = '{{"sentence1": "a film", "sentence2": "the {} movie", "label": {}}}'
    train = [line.format(WORDS[i], 1.0 + i % 4) for i in range(15)] + [line.format("x", label)]
    (glue / "train.jsonl").write_text("\n".join(train) + "\n")
    dev = [line.format(WORDS[i], dev_label) for i in range(8)]
    (glue / "validation.jsonl").write_text("\n".join(dev) + "\n")


def strict_json(path: Path) -> str:
    """Whether a file is strict JSON (no NaN or Infinity literals)."""

    def refuse(constant: str):
        raise ValueError(constant)

    try:
        json.loads(path.read_text(), parse_constant=refuse)
        return "strict JSON"
    except (OSError, ValueError) as error:
        return f"not strict JSON ({error})"


def can_mount() -> bool:
    probe = ROOT / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
    )
    if done.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    return done.returncode == 0


def sigint_at(module: str, *args: str) -> tuple[int, str, str]:
    """`microtune ARGS` given a real Ctrl-C when its start-up first imports `module`."""
    ready()
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_SCRIPT, module, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


# -- the set-up ---------------------------------------------------------------------------------


def set_up() -> None:
    make_tiny_model("bert", BASE)
    rng = random.Random(0)  # the toy task of tests/conftest.py's toy_files
    positive = {"good", "great", "fun", "best", "love"}
    glue = DATA / "glue" / "sst2"
    glue.mkdir(parents=True)
    for split, size in (("train", 96), ("validation", 32)):
        lines = []
        for _ in range(size):
            words = rng.sample(WORDS, 5)
            row = {"sentence": " ".join(words), "label": int(bool(positive & set(words)))}
            lines.append(json.dumps(row) + "\n")
        (glue / f"{split}.jsonl").write_text("".join(lines))
    code, _, err = microtune(*train_args(ROOT, "--output", ARTIFACT))
    assert code == 0, err


# -- the campaign -------------------------------------------------------------------------------


def nan_and_inf() -> None:
    def after_train(folder, code, out, err):
        saved = (folder / "out" / "adapter.safetensors").exists()
        return "artifact saved" if saved else "nothing saved"

    for option in (
        "--lr inf",
        "--projection-std-scale inf",
        "--lr 1e6 (full)",
        "--projection-std-scale 1e30",
    ):
        flag, value = option.split()[:2]
        method = "full" if "(full)" in option else "slash"
        case(
            f"train {option}",
            "silent-wrong",
            lambda f, flag=flag, value=value, method=method: microtune(
                *train_args(f, flag, value, method=method)
            ),
            note=after_train,
        )

    def nan_artifact(folder: Path) -> None:
        import torch

        edit_tensors(
            folder, lambda t: t.update({n: torch.full_like(v, float("nan")) for n, v in t.items()})
        )

    for command in ("merge", "export"):

        def run(f, command=command):
            nan_artifact(f)
            extra = (
                ["--data-dir", f / "data", "--check-examples", "8"] if command == "export" else []
            )
            return microtune(command, "--artifact", f / "artifact", "--output", f / "m", *extra)

        case(
            f"{command} an all-NaN artifact",
            "silent-wrong",
            run,
            note=lambda f, *_: "no output" if not (f / "m").exists() else "output written",
        )

    for label in ("NaN", '"nan"', "Infinity"):

        def run(f, label=label):
            stsb(f, label)
            return microtune(*train_args(f, task="stsb"))

        case(f"STS-B label {label}", "silent-wrong", run)

    def undefined_metric(f):
        stsb(f, "1.0")  # every dev label 2.5: Pearson is undefined
        return microtune(*train_args(f, task="stsb"))

    case(
        "NaN metric (constant dev labels) in metrics.json",
        "silent-wrong",
        undefined_metric,
        note=lambda f, *_: strict_json(f / "out" / "metrics.json"),
    )


def user_files(folder: Path) -> Path:
    out = folder / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "metrics.json").write_text('{"mine": true}\n')
    return out


def output_folders() -> None:
    def empty_output(f):
        (f / "cwd").mkdir()
        (f / "cwd" / "keep.txt").write_text("mine\n")
        return microtune(*train_args(f, "--output", ""), cwd=f / "cwd")

    case("train --output ''", "data loss", empty_output, watch=lambda f: [f / "cwd"])
    case(
        "train into a folder with the user's metrics.json",
        "data loss",
        lambda f: (user_files(f), microtune(*train_args(f)))[1],
        watch=lambda f: [f / "out"],
    )

    def checkpoint_run(f):
        interrupted = interrupted_run()
        shutil.copytree(interrupted, f / "out")
        return f / "out"

    case(
        "train over a checkpoint, no --resume (after kill -9)",
        "data loss",
        lambda f: (
            checkpoint_run(f),
            microtune(*train_args(f, "--checkpoint-every", "1", "--max-steps", "4")),
        )[1],
        watch=lambda f: [f / "out"],
    )
    case(
        "train over another run's artifact",
        "data loss",
        lambda f: (shutil.copytree(ARTIFACT, f / "out"), microtune(*train_args(f, "--seed", "1")))[
            1
        ],
        watch=lambda f: [f / "out"],
    )
    case(
        "merge --output the base model's folder",
        "data loss",
        lambda f: microtune("merge", "--artifact", f / "artifact", "--output", BASE),
    )
    case(
        "merge --overwrite the base model's folder",
        "data loss",
        lambda f: microtune("merge", "--artifact", f / "artifact", "--output", BASE, "--overwrite"),
    )

    def two_runs(f):
        args = train_args(f, "--max-steps", "300", "--checkpoint-every", "0")
        ready()
        first = subprocess.Popen(
            [sys.executable, "-m", "microtune", *map(str, args)],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not (f / "out" / ".microtune.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        code, out, err = microtune(*args)
        _, first_err = first.communicate()
        current["note"] = f"the first run: exit {first.returncode}"
        return code, out, err

    case(
        "two trainings on one --output (the second one)",
        "silent-wrong",
        two_runs,
    )


def interrupted_run() -> Path:
    """A run killed with -9 in step 3, after step 2's checkpoint (made once)."""
    interrupted = ROOT / "interrupted"
    if not interrupted.exists():
        args = train_args(
            ROOT, "--checkpoint-every", "1", "--max-steps", "4", "--output", interrupted
        )
        process = subprocess.Popen(
            [sys.executable, "-c", STALL, *map(str, args)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout.readline().strip() == "stalled"
        process.kill()
        process.wait()
    return interrupted


STALL = """
import sys, time, torch
real, calls = torch.optim.AdamW.step, [0]
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        print("stalled", flush=True)
        time.sleep(300)
    return real(self, *args, **kwargs)
torch.optim.AdamW.step = step
from microtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def artifacts() -> None:
    def eval_after(change):
        def run(f):
            edit_config(f, change)
            return microtune("eval", "--artifact", f / "artifact", "--data-dir", f / "data")

        return run

    metric = lambda f, c, out, e: out.strip().replace("\n", " ")[:60] if c == 0 else ""  # noqa: E731
    case(
        "edited read-out (mean → first)",
        "silent-wrong",
        eval_after(lambda c: c["head"].update(readout="first")),
        note=metric,
    )
    case(
        "edited projection seed (0 → 1)",
        "silent-wrong",
        eval_after(lambda c: c["method_config"].update(projection_seed=1)),
        note=metric,
    )
    case("max_length 0", "traceback", eval_after(lambda c: c.update(max_length=0)))
    case("d as a string", "traceback", eval_after(lambda c: c["method_config"].update(d="8")))
    case("a missing key (head)", "traceback", eval_after(lambda c: c.pop("head")))
    case("d = 10^12", "traceback", eval_after(lambda c: c["method_config"].update(d=10**12)))
    case(
        "num_labels = 10^9",
        "traceback",
        eval_after(
            lambda c: (c["head"].update(num_labels=10**9), c["task"].update(num_labels=10**9))
        ),
    )

    def cast(dtype):
        def run(f):

            edit_tensors(f, lambda t: t.update({"method.z": t["method.z"].to(dtype)}))
            return microtune("eval", "--artifact", f / "artifact", "--data-dir", f / "data")

        return run

    import torch

    case("z stored as int64 (hash updated)", "silent cast", cast(torch.int64))
    case("z stored as bool (hash updated)", "silent cast", cast(torch.bool))

    def shuffled_vocabulary(f):
        model = f / "shuffled"
        shutil.copytree(BASE, model)
        tokenizer = json.loads((model / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        words = [w for w in vocab if not w.startswith("[")]
        ids = [vocab[w] for w in words]
        random.Random(1).shuffle(ids)
        vocab.update(zip(words, ids, strict=True))
        (model / "tokenizer.json").write_text(json.dumps(tokenizer))
        return microtune(
            "eval", "--artifact", f / "artifact", "--data-dir", f / "data", "--model", model
        )

    case("a shuffled vocabulary (eval --model)", "silent-wrong", shuffled_vocabulary)

    def outside(field, value):
        def run(f):
            secret = f / "data" / "glue" / "secret"
            secret.mkdir(parents=True)
            shutil.copy(DATA / "glue" / "sst2" / "validation.jsonl", secret / "validation.jsonl")
            edit_config(f, lambda c: c["task"].update({field: value}))
            return microtune(
                "eval", "--artifact", f / "artifact", "--data-dir", f / "data" / "glue" / "sst2"
            )

        return run

    case(
        "task.name '../secret' (eval reads outside --data-dir)",
        "outside read",
        outside("name", "../../secret"),
    )
    case(
        "task.dev_split '../../../secret/validation'",
        "outside read",
        outside("dev_split", "../../../secret/validation"),
    )


def tracebacks(mountable: bool) -> None:
    case("train --epochs inf", "traceback", lambda f: microtune(*train_args(f, "--epochs", "inf")))
    case(
        "train --weight-decay -1",
        "traceback",
        lambda f: microtune(*train_args(f, "--weight-decay", "-1")),
    )
    case(
        "train --seed 2^70", "traceback", lambda f: microtune(*train_args(f, "--seed", str(2**70)))
    )

    def data(name, content):
        def run(f):
            train = f / "data" / "glue" / "sst2" / "train.jsonl"
            train.unlink()
            (train.parent / name).write_bytes(content)
            return microtune(*train_args(f))

        return run

    case(
        "non-UTF-8 data", "traceback", data("train.jsonl", b'{"sentence": "caf\xe9", "label": 1}\n')
    )
    case(
        "JSON array with a non-object element",
        "traceback",
        data("train.json", b'[{"sentence": "a film", "label": 1}, 5]'),
    )

    def artifact_then_eval(damage):
        def run(f):
            damage(f)
            return microtune("eval", "--artifact", f / "artifact", "--data-dir", f / "data")

        return run

    def truncate(f):
        path = f / "artifact" / "microtune.json"
        path.write_bytes(path.read_bytes()[:200])

    case("truncated microtune.json", "traceback", artifact_then_eval(truncate))

    def wrong_shape(f):
        import torch

        edit_tensors(f, lambda t: t.update({"method.z": torch.zeros(9)}))

    case("wrong-shape tensor (hash updated)", "traceback", artifact_then_eval(wrong_shape))
    case(
        "missing tensor (hash updated)",
        "traceback",
        artifact_then_eval(lambda f: edit_tensors(f, lambda t: t.pop("head.linear.bias"))),
    )

    def corrupt_checkpoint(f):
        out = f / "out"
        shutil.copytree(interrupted_run(), out)
        (out / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
        return microtune(*train_args(f, "--checkpoint-every", "1", "--max-steps", "4", "--resume"))

    case("corrupt checkpoint with --resume", "traceback", corrupt_checkpoint)

    def under_a_file(f):
        (f / "file.txt").write_text("mine\n")
        return microtune(*train_args(f, "--output", f / "file.txt" / "run"))

    case("--output under a file", "traceback", under_a_file, watch=lambda f: [f / "file.txt"])

    def mounted(f, size: str, read_only: bool = False) -> Path:
        disk = f / "disk"
        disk.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True
        )
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        return disk

    def full_disk(f):
        disk = mounted(f, "64k")
        try:
            result = microtune("merge", "--artifact", f / "artifact", "--output", disk / "merged")
            left = sorted(os.listdir(disk))
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        current["note"] = f"left on the disk: {left or 'nothing'}"
        return result

    def full_disk_train(f):
        disk = mounted(f, "8k")
        try:
            result = microtune(*train_args(f, "--output", disk / "run"))
            left = sorted(os.listdir(disk))
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        current["note"] = f"left on the disk: {left or 'nothing'}"
        return result

    def read_only(f):
        disk = mounted(f, "1m", read_only=True)
        try:
            return microtune(*train_args(f, "--output", disk / "run"))
        finally:
            subprocess.run(["umount", str(disk)], check=True)

    if mountable:
        case("a read-only folder (ro tmpfs)", "traceback", read_only)
        case(
            "a full disk during merge (64 KiB tmpfs)",
            "traceback",
            full_disk,
        )
        case("a full disk during train (8 KiB tmpfs)", "traceback", full_disk_train)
    else:
        rows.append(("a read-only folder", "traceback", "not run", "no tmpfs mount here", "", ""))
        rows.append(
            (
                "a full disk during merge",
                "traceback",
                "not run",
                "no tmpfs mount here: tests/test_output_folders.py simulates it",
                "",
                "",
            )
        )

    for module in ("torch", "numpy", "numpy.linalg", "transformers"):
        case(
            f"Ctrl-C at start-up (SIGINT while importing {module})",
            "traceback",
            lambda f, module=module: sigint_at(module, "info"),
        )


def smaller() -> None:
    def torn_tmp(f):
        shutil.copytree(interrupted_run(), f / "out")
        (f / "out" / ".checkpoint.safetensors.k2j_x9aa.tmp").write_bytes(b"")
        return microtune(*train_args(f, "--checkpoint-every", "1", "--max-steps", "4", "--resume"))

    case(
        "0-byte .tmp left by a kill, then --resume",
        "litter",
        torn_tmp,
        note=lambda f, *_: f"{len(list((f / 'out').glob('.*.tmp')))} .tmp left",
    )

    def torn_info(f):
        path = f / "artifact" / "adapter.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        return microtune("info", "--artifact", f / "artifact")

    case("info on a torn artifact", "silent-wrong", torn_info)
    case(
        "eval --task cola on an SST-2 artifact",
        "silent-wrong",
        lambda f: microtune(
            "eval", "--artifact", f / "artifact", "--data-dir", f / "data", "--task", "cola"
        ),
    )

    def merged_mode(f, code, out, err):
        path = f / "m" / "model.safetensors"
        return (
            f"model.safetensors {oct(stat.S_IMODE(path.stat().st_mode))}" if path.exists() else ""
        )

    case(
        "merged model.safetensors permissions",
        "0600",
        lambda f: microtune("merge", "--artifact", f / "artifact", "--output", f / "m"),
        note=merged_mode,
    )
    case(
        "--grad-accum 1000 on a 3-step run",
        "silent (ran > 10 min)",
        lambda f: microtune(*train_args(f, "--grad-accum", "1000")),
    )


def main() -> None:
    started = time.time()
    set_up()
    mountable = can_mount()
    nan_and_inf()
    output_folders()
    artifacts()
    tracebacks(mountable)
    smaller()
    print("## Issue 12 campaign re-run\n")
    print(
        f"`python bench/hostile_campaign.py` ({len(rows)} cases, {time.time() - started:.0f} s; "
        "tiny random BERT, toy data; each case a `python -m microtune` subprocess)\n"
    )
    print(
        "| # | case | before | now: exit | now: first stderr line | user files unchanged | note |"
    )
    print("|---|---|---|---|---|---|---|")
    for index, (name, before, code, line, unchanged, note) in enumerate(rows, 1):
        print(f"| {index} | {name} | {before} | {code} | {line} | {unchanged} | {note} |")
    counts = counts_by_kind()
    print(f"\n## tests/test_hostile.py: {sum(counts.values())} cases by kind\n")
    print("| kind | cases |")
    print("|---|---|")
    for kind, count in counts.items():
        print(f"| {KINDS[kind]} | {count} |")
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
