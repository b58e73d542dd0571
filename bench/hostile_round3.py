"""Re-run issue 32's "What was seen" (round 3) through the real command line.

Each case runs `python -m microtune` (or torchrun, or the server) in a subprocess, bounded by a
timeout, on a tiny random BERT or GPT-2 and toy files in a temporary folder (the sources of
`bench/hostile_round2.py`), and the script prints one Markdown table: the case, the exit code
or HTTP status, the first stderr line (for a success: what came out), the time taken and
whether every file of the case's folder is byte-identical afterwards. Then the hostile table's
count by kind (tests/test_hostile.py) and its run time.

    python bench/hostile_round3.py            # the table of cases
    python bench/hostile_round3.py --suite    # and the hostile table's counts and run time
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))

import hostile_round2 as round2  # noqa: E402  its tiny models, toy data and suite runner

from microtune.common.manifest import seal_record  # noqa: E402

ROOT = round2.ROOT
ENV = round2.ENV
TIMEOUT = 120
COMMON = round2.COMMON
Outcome = tuple[str, str, float]  # (exit code or HTTP status, one line, seconds)


def microtune(args: str | list[str], cwd: Path, env: dict | None = None) -> Outcome:
    """(exit code or "timeout", the first stderr line or, for a success, stdout's lines)."""
    start = time.perf_counter()
    argv = args.split() if isinstance(args, str) else args
    try:
        done = subprocess.run(
            [sys.executable, "-m", "microtune", *argv],
            cwd=cwd,
            env={**ENV, **(env or {})},
            capture_output=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"still running after {TIMEOUT} s (killed)", TIMEOUT
    err = done.stderr.decode(errors="replace").strip().splitlines()
    err = [line for line in err if not line.startswith("microtune: loading ")]  # status lines
    out = done.stdout.decode(errors="replace").strip().splitlines()
    line = err[0] if err else f"(stdout: {len(out)} lines) {out[0][:80] if out else ''}"
    return str(done.returncode), line, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup() -> dict[str, Path]:
    """round 2's sources, another task's run, a classifier on the tiny GPT-2, and exports."""
    src = round2.setup()
    base, data = src["base"], src["data"]
    toy = ROOT / "toy.jsonl"
    for name, args in (
        (
            "other",
            f"train --task classification --model {base} --train-file {toy} --dev-file {toy} "
            f"--text-columns text --label-column label {COMMON}",
        ),
        ("gpt2-sst2", f"train --task sst2 --model {src['gpt2']} --data-dir {data} {COMMON}"),
    ):
        code, line, _ = microtune(f"{args} --output {ROOT / name}", ROOT)
        assert code == "0", line
        src[name] = ROOT / name
    check = f"--data-dir {data} --check-examples 8"
    for name, args in (
        ("onnx", f"export --artifact {src['artifact']} {check} --format onnx"),
        ("onnx-other", f"export --artifact {src['other']} --data-file {toy} --format onnx"),
        ("merged", f"merge --artifact {src['artifact']}"),
        ("peft", f"export --artifact {src['artifact']} {check} --format peft"),
    ):
        code, line, _ = microtune(f"{args} --output {ROOT / name}", ROOT)
        assert code == "0", line
        src[name] = ROOT / name
    (ROOT / "inputs.txt").write_text("the film is good\na dull plot\n")
    return src


def copy(src: Path, folder: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(src, folder / (name or src.name)))


def edit_record(folder: Path, change: Callable[[dict], None], reseal: bool = False) -> None:
    path = folder / "microtune_export.json"
    record = json.loads(path.read_text())
    change(record)
    if reseal:  # the hashes recomputed, as a user who knows them would
        body = {k: v for k, v in record.items() if k not in ("files", "record_sha256")}
        record = seal_record(body, folder)
    path.write_text(json.dumps(record))


def swap_labels(record: dict) -> None:
    names = record["task"].get("label_names") or ["negative", "positive"]
    record["task"]["label_names"] = names[::-1]


def weights_outside(folder: Path) -> None:
    """model.onnx rewritten to read its weights from ../outside/w.bin."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"))
    outside = folder.parent / "outside"
    outside.mkdir()
    onnx.save_model(graph, str(outside / "m.onnx"), save_as_external_data=True, location="w.bin")
    moved = onnx.load(str(outside / "m.onnx"), load_external_data=False)
    for tensor in moved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/w.bin"
    onnx.save_model(moved, str(folder / "model.onnx"))


def predict_folder(folder: Path) -> str:
    return f"predict --model-folder {folder} --input {ROOT / 'inputs.txt'}"


def _replaced_graph(f: Path, s: dict) -> str:
    onnx_folder = copy(s["onnx"], f)
    shutil.copy(s["onnx-other"] / "model.onnx", onnx_folder / "model.onnx")
    return predict_folder(onnx_folder)


def _edited_labels(f: Path, s: dict) -> str:
    onnx_folder = copy(s["onnx"], f)
    edit_record(onnx_folder, swap_labels)
    return predict_folder(onnx_folder)


def _garbage(f: Path, s: dict, reseal: bool) -> str:
    onnx_folder = copy(s["onnx"], f)
    (onnx_folder / "model.onnx").write_bytes(b"\x00garbage" * 64)
    if reseal:
        edit_record(onnx_folder, lambda r: None, reseal=True)
    return predict_folder(onnx_folder)


def _outside(f: Path, s: dict) -> str:
    onnx_folder = copy(s["onnx"], f)
    weights_outside(onnx_folder)
    edit_record(onnx_folder, lambda r: None, reseal=True)
    return predict_folder(onnx_folder)


def _adapter_config_dropped(f: Path, s: dict) -> str:
    merged = copy(s["merged"], f)
    shutil.copy(s["peft"] / "adapter_config.json", merged / "adapter_config.json")
    return predict_folder(merged)


def _head_edited(f: Path, s: dict) -> str:
    peft = copy(s["peft"], f)
    with open(peft / "head.safetensors", "ab") as handle:
        handle.write(b" ")
    return predict_folder(peft)


def _overwrite(f: Path, s: dict, earlier: str, command: str) -> str:
    folder = copy(s[earlier], f, "out")
    (folder / "notes.txt").write_text("the user's notes\n")
    return f"{command.format(**s)} --output {folder} --overwrite"


def _stale_artifact_link(f: Path, s: dict) -> str:
    served = copy(s["artifact"], f, "served")
    (served / "adapter.safetensors").unlink()
    (served / "adapter.safetensors").symlink_to(s["artifact"] / "adapter.safetensors")
    return f"serve --artifacts {served} --port 0"


STALE = {
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MICROTUNE_DIST_JOIN_TIMEOUT_S": "3",
}
ONNX_AGAIN = "export --artifact {artifact} --data-dir {data} --check-examples 8 --format onnx"
FEDERATE = (
    "federate --task sst2 --method slash --d 8 --model {base} --data-dir {data} --max-length 16 "
    "--no-progress --clients 2 --clients-per-round 2 --rounds 1 --local-steps 1"
)
# (the case, a function of (case folder, sources) -> arguments, extra environment)
CASES: list[tuple[str, Callable[[Path, dict], str], dict | None]] = [
    ("ONNX export, model.onnx replaced by another task's", _replaced_graph, None),
    ("ONNX export, label names edited in microtune_export.json", _edited_labels, None),
    ("ONNX export, a garbage model.onnx", lambda f, s: _garbage(f, s, False), None),
    ("ONNX export, garbage model.onnx, hashes recomputed", lambda f, s: _garbage(f, s, True), None),
    ("ONNX export, weights outside the folder, hashes recomputed", _outside, None),
    ("merged export, an adapter_config.json dropped in", _adapter_config_dropped, None),
    ("peft export, head.safetensors edited", _head_edited, None),
    (
        "export --format onnx --overwrite onto an ONNX export with notes.txt",
        lambda f, s: _overwrite(f, s, "onnx", ONNX_AGAIN),
        None,
    ),
    (
        "merge --overwrite onto a merged export with notes.txt",
        lambda f, s: _overwrite(f, s, "merged", "merge --artifact {artifact}"),
        None,
    ),
    (
        "merge --overwrite onto an ONNX export with notes.txt",
        lambda f, s: _overwrite(f, s, "onnx", "merge --artifact {artifact}"),
        None,
    ),
    (
        "serve a causal-lm artifact beside a classifier on the same base",
        lambda f, s: f"serve --artifacts {copy(s['gpt2-sst2'], f)} {copy(s['causal'], f)} --port 0",
        None,
    ),
    (
        "predict --input my.csv (a text,label header), 3 rows",
        lambda f, s: (
            (f / "my.csv").write_text("sentence,label\ngood fun,pos\na dull plot,neg\nlove,pos\n"),
            f"predict --artifact {s['artifact']} --input {f / 'my.csv'}",
        )[1],
        None,
    ),
    (
        "train with stale launcher variables (WORLD_SIZE=2, no rank 1)",
        lambda f, s: (
            f"train --task sst2 --model {s['base']} --data-dir {s['data']} {COMMON} "
            f"--output {f}/out"
        ),
        STALE,
    ),
    (
        "federate --client-dp-delta 0.5",
        lambda f, s: (
            f"{FEDERATE.format(**s)} --output {f}/out --client-dp-epsilon 8 --client-dp-delta 0.5"
        ),
        None,
    ),
    ("serve an artifact whose adapter.safetensors links out", _stale_artifact_link, None),
]


def run_cases(sources: dict) -> None:
    print("| what was seen | exit | first stderr line (a success: its output) | seconds | "
          "files unchanged |")  # fmt: skip
    print("|---|---|---|---|---|")
    for number, (bullet, build, env) in enumerate(CASES):
        folder = ROOT / f"case{number}"
        folder.mkdir()
        args = build(folder, sources)
        if env is not None:
            env = {**env, "MASTER_PORT": str(free_port())}
        before = round2.snapshot(folder)
        code, line, seconds = microtune(args, folder, env)
        row(bullet, code, line, seconds, round2.snapshot(folder) == before)
    row(*torchrun_killed(sources))
    row(*federate_warning(sources))
    for outcome in server_requests(sources):
        row(*outcome)


def row(bullet: str, code: str, line: str, seconds: float, same: bool) -> None:
    line = line.replace("|", "\\|")
    print(f"| {bullet} | {code} | {line} | {seconds:.1f} | {'yes' if same else 'NO'} |", flush=True)


def _alive(pid: int) -> bool:
    """Running: a zombie is dead once its last thread has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status or threads != [str(pid)]


def torchrun_killed(sources: dict) -> tuple[str, str, str, float, bool]:
    """torchrun (2 gloo workers) killed with -9 with its process group once training: how many
    workers are still alive 10 s later, and whether the run's folder is free."""
    from filelock import FileLock, Timeout

    folder = ROOT / "torchrun"
    args = f"train --task sst2 --model {sources['base']} --data-dir {sources['data']} " + COMMON
    args = args.replace("--max-steps 2", "--max-steps 100000 --checkpoint-every 5")
    args = args.replace("--d 8 ", "")  # torchrun's own parser takes --d as one of its options
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    launcher += ["--log-dir", str(ROOT / "torchrun-logs"), "--redirects", "3", "-m", "microtune"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*launcher, *args.split(), "--output", str(folder)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job's
    )
    deadline = time.monotonic() + TIMEOUT
    while not (folder / "checkpoint.safetensors").is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            err = process.communicate()[1].strip().splitlines()
            return "torchrun -9 while training", "not run", (err or ["?"])[-1], 0.0, True
        time.sleep(0.05)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    workers = [int(pid) for pid in children]
    start = time.perf_counter()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(10)
    alive = [pid for pid in workers if _alive(pid)]
    try:
        FileLock(folder / ".microtune.lock", timeout=0).acquire()
        free = "free"
    except Timeout:
        free = "still locked"
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    line = f"{len(alive)} of {len(workers)} workers alive 10 s after; the output folder {free}"
    seconds = time.perf_counter() - start
    return "torchrun -9 (process group) while training", "-9", line, seconds, True


def federate_warning(sources: dict) -> tuple[str, str, str, float, bool]:
    """One tiny federation: Flower's deprecation lines on stderr."""
    folder = ROOT / "federate"
    folder.mkdir()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "microtune", *FEDERATE.format(**sources).split(), "--output",
         str(folder / "out")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    noted = sum("DEPRECATED" in line for line in lines)
    line = f"{noted} of its {len(lines)} stderr lines say DEPRECATED: {lines[:2]}"
    return (
        "federate: Flower's run_simulation notice",
        str(done.returncode),
        line,
        (time.perf_counter() - start),
        True,
    )


def server_requests(sources: dict) -> list[tuple[str, str, str, float, bool]]:
    """A real `microtune serve` with an artifact root: requests that landed in round 3."""
    import httpx

    root = ROOT / "served"
    copy(sources["artifact"], root, "sst2")
    linked = copy(sources["artifact"], root, "linked")
    (linked / "adapter.safetensors").unlink()
    (linked / "adapter.safetensors").symlink_to(sources["artifact"] / "adapter.safetensors")
    argv = ["serve", "--artifacts", str(root / "sst2"), "--artifact-root", str(root)]
    server = subprocess.Popen(
        [sys.executable, "-m", "microtune", *argv, "--port", "0"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    outcomes = []
    try:
        url = json.loads(server.stdout.readline())["serving"]
        with httpx.Client(base_url=url, timeout=60) as client:
            for name, path, body in (
                ("serve: generate with temperature", "/v1/generate",
                 {"task": "sst2", "prompts": ["a"], "temperature": 0.7}),
                ("serve: max_new_tokens true", "/v1/generate",
                 {"task": "sst2", "prompts": ["a"], "max_new_tokens": True}),
                ("serve: hot-load, adapter.safetensors linked out", "/v1/tasks",
                 {"path": "linked"}),
            ):  # fmt: skip
                start = time.perf_counter()
                response = client.post(path, json=body)
                line = response.json().get("error", response.text)[:160]
                outcomes.append((name, str(response.status_code), line,
                                 time.perf_counter() - start, True))  # fmt: skip
            metrics = client.get("/metrics").text
            counted = [m for m in metrics.splitlines() if 'status="4' in m or "4xx" in m]
            outcomes.append(("serve: 4xx answers in /metrics", "200",
                             f"{len(counted)} 4xx series: {counted[:1]}", 0.0, True))  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    return outcomes


if __name__ == "__main__":
    try:
        if "--suite-only" not in sys.argv:
            run_cases(setup())
        if "--suite" in sys.argv or "--suite-only" in sys.argv:
            round2.run_suite()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
