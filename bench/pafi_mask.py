"""PaFi: mask computation time and peak memory, and optimizer state against full fine-tuning.

Mask cases run on the packaged MiniLM (each mask mode) and on a random-config Llama of 1.1B
parameters (TinyLlama's shape: 22 blocks, hidden 2048, FFN 5632, built on the CPU in float32
with N(0, 0.02) weights), at k = 0.5% of the block weight matrices. Each case runs in its own
fresh subprocess: the worker builds the model, reads every weight once (safetensors weights are
memory-mapped; a first read would count their pages as the mask's), collects garbage, reads its
resident set size (VmRSS), resets the kernel's high-water mark (writing 5 to
/proc/self/clear_refs, Linux >= 4.0) so building the model cannot mask the figure, computes the
mask, and reports VmHWM minus that RSS: the peak memory the mask computation added. Workers run
with glibc's MALLOC_MMAP_THRESHOLD_=131072 so freed tensors go back to the OS and RSS follows
live tensors. Beside it the script prints the sizes that bound it: the candidates' total bytes
(a second copy of the weights, which the streaming selection never makes), the largest
candidate matrix in float32, and the k-pool (k float32 scores + k int64 positions).

Optimizer state: one AdamW step on a batch of real SST-2 sentences with PaFi (k = 0.5%) and
with full fine-tuning on MiniLM, summing the bytes of every tensor in the optimizer's state.

    python bench/pafi_mask.py                  # everything, a few minutes on 2 cores
    python bench/pafi_mask.py --skip-large     # MiniLM only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
)
LARGE_LLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=float, default=0.005, help="PaFi k (fraction or count)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 1.1B Llama case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--data-file", default=str(DATA_FILE))
    # Internal: run one case and print its result as one JSON line.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mask", default="smallest", help=argparse.SUPPRESS)
    return parser.parse_args()


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def build_backbone(model: str):
    import torch

    if model == "minilm":
        from microtune.backbone.load import load_backbone

        return load_backbone("minilm")[0]
    from transformers import AutoModel, LlamaConfig

    with torch.device("meta"):
        backbone = AutoModel.from_config(LlamaConfig(**LARGE_LLAMA))
    backbone.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return backbone


def mask_worker(args: argparse.Namespace) -> dict:
    import torch

    from microtune.backbone.arch import arch_for
    from microtune.methods.pafi import PaFiConfig, candidate_weights, compute_mask

    torch.set_num_threads(args.threads)
    backbone = build_backbone(args.worker)
    candidates = candidate_weights(backbone, arch_for(backbone))
    with torch.no_grad():  # page in weights loaded lazily from a memory-mapped file
        for parameter in backbone.parameters():
            parameter.sum()
    gc.collect()
    baseline = memory_kib()["VmRSS"]
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    started = time.perf_counter()
    positions = compute_mask(candidates, PaFiConfig(k=args.k, mask=args.mask))
    seconds = time.perf_counter() - started
    peak = memory_kib()["VmHWM"]
    k = positions.numel()
    return {
        "model": args.worker,
        "mask": args.mask,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "candidates": sum(t.numel() for _, t in candidates),
        "k": k,
        "seconds": round(seconds, 2),
        "peak_extra_mib": round((peak - baseline) / 1024, 1),
        "hwm_reset": reset,
        "candidates_mib": round(sum(t.numel() * t.element_size() for _, t in candidates) / MIB, 1),
        "largest_matrix_mib": round(max(t.numel() for _, t in candidates) * 4 / MIB, 1),
        "pool_mib": round(k * (4 + 8) / MIB, 1),
    }


def run_worker(case: str, mask: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", case, "--mask", mask, "--k", str(args.k)]
    command += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {case}/{mask} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    import torch

    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def optimizer_states(args: argparse.Namespace) -> list[dict]:
    """One real AdamW step per method on MiniLM; the state it leaves behind."""
    import torch

    from microtune.backbone.load import load_backbone
    from microtune.methods import build_method
    from microtune.model import HeadConfig, TaskModel
    from microtune.tasks.types import loss_fn

    lines = Path(args.data_file).read_text().splitlines()[:16]
    rows = [json.loads(line) for line in lines]
    results = []
    for name, options in (("pafi", {"k": args.k}), ("full", {})):
        backbone, tokenizer = load_backbone("minilm")
        model = TaskModel(backbone, HeadConfig(num_labels=2), build_method(name, options))
        batch = tokenizer(
            [r["sentence"] for r in rows], padding=True, truncation=True, return_tensors="pt"
        )
        labels = torch.tensor([int(r["label"]) for r in rows])
        optimizer = torch.optim.AdamW(model.trainable_state().values(), lr=1e-4)
        model.train()
        loss_fn(model(**batch), labels).backward()
        optimizer.step()
        trained = model.count_trainable()
        results.append(
            {
                "method": name,
                "trained": trained["total"],
                "state_bytes": optimizer_state_bytes(optimizer),
                "formula_bytes": 8 * trained["total"],  # exp_avg + exp_avg_sq, float32 each
            }
        )
    return results


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(mask_worker(args)))
        return
    cases = [("minilm", mask) for mask in ("smallest", "largest", "random")]
    if not args.skip_large:
        cases.append(("llama-1.1b", "smallest"))
    print(f"PaFi mask computation, k = {args.k} of the block weight matrices, one worker each")
    header = (
        f"{'model':<11} {'mask':<9} {'params':>13} {'k':>10} {'time s':>7} {'peak+ MiB':>10} "
        f"{'weights MiB':>12} {'1 matrix MiB':>13} {'pool MiB':>9}"
    )
    print(header)
    for case, mask in cases:
        r = run_worker(case, mask, args)
        flag = "" if r["hwm_reset"] else "  (high-water mark not reset: may be the load peak)"
        print(
            f"{r['model']:<11} {r['mask']:<9} {r['parameters']:>13,} {r['k']:>10,} "
            f"{r['seconds']:>7.2f} {r['peak_extra_mib']:>10.1f} {r['candidates_mib']:>12.1f} "
            f"{r['largest_matrix_mib']:>13.1f} {r['pool_mib']:>9.1f}{flag}"
        )
    print()
    print("AdamW state after one real step on MiniLM (SST-2 batch of 16)")
    states = optimizer_states(args)
    for s in states:
        print(
            f"{s['method']:<5} trained {s['trained']:>11,}  state {s['state_bytes']:>12,} bytes"
            f"  (2 x float32 per trained number: {s['formula_bytes']:,})"
        )
    pafi, full = states
    print(f"pafi / full optimizer state: {pafi['state_bytes'] / full['state_bytes']:.4f}")


if __name__ == "__main__":
    main()
