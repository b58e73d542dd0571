"""Step time of private training against non-private, side by side in one run.

On the packaged MiniLM and one batch of real SST-2 training rows, times one optimizer step of:
SLaSh and DP-SLaSh (microtune's closed-form per-example gradient), LoRA and DP-LoRA (the
general torch.func path), BitFit and full fine-tuning with and without DP (ghost clipping), and
Opacus' own DP-BitFit (`GradSampleModule` + `DPOptimizer`, only biases and the head trainable).
Rounds are interleaved so every contender sees the same machine state; prints medians with
min-max spread and the ratios the issue asks for: DP-SLaSh / SLaSh (goal <= 1.10), DP-LoRA /
LoRA, DP-SLaSh / Opacus DP-BitFit (goal <= 0.8), and each DP step over its non-private one.
`--compare-vmap` adds DP full fine-tuning through the torch.func path (slow: the ghost path's
yardstick).

    python bench/dp_step_time.py [--batch-size 32] [--rounds 5] [--device cpu] [--compare-vmap]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from microtune.backbone.load import load_backbone
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.privacy.config import DPConfig
from microtune.privacy.dpsgd import DPStep, PrivacyPlan
from microtune.privacy.per_example import PerExampleGradients
from microtune.tasks.data import batches, encode
from microtune.tasks.examples import load_examples
from microtune.tasks.spec import get_task
from microtune.tasks.types import loss_fn
from microtune.training.config import TrainConfig
from microtune.training.steps import AdamWStep

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def task_model(method: str, device: torch.device) -> TaskModel:
    torch.manual_seed(0)
    backbone, _ = load_backbone()
    return TaskModel(backbone, HeadConfig(num_labels=2), build_method(method)).to(device)


def microtune_step(method: str, private: bool, batch, device, force_vmap: bool = False):
    """A closure running one step of `method` (DP-SGD when private) on the batch."""
    model = task_model(method, device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    size = len(batch[1])
    if private:
        plan = PrivacyPlan.resolve(DPConfig(sigma=1.0, batch=size), 67_349, 1000)
        step = DPStep(plan)
    else:
        step = AdamWStep()
    step.bind(model, params, TrainConfig(max_steps=1000, learning_rate=1e-3), 1000)
    if force_vmap:
        step.per_example = PerExampleGradients(model, params)
    step.train_mode(model)
    return lambda: step(model, [batch], size)


def opacus_bitfit_step(batch, device):
    """Opacus' DP-SGD on BitFit: per-sample gradients by its hooks, clipping and noise."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Opacus' hooks record activations only in train mode: train mode, dropout rates zeroed
    # (microtune's DP step runs without dropout too).
    model = task_model("bitfit", device).train()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    for name, parameter in model.named_parameters():
        if ".pooler." in name:  # unused by the mean read-out; Opacus refuses gradient-less ones
            parameter.requires_grad_(False)
    module = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=len(batch[1]),
        loss_reduction="mean",
    )
    inputs, labels = batch

    def step() -> None:
        loss_fn(module(**inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare-vmap", action="store_true", help="add DP full via torch.func")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=UserWarning)  # Opacus' and vmap's notices

    _, tokenizer = load_backbone()
    rows = encode(tokenizer, load_examples(get_task("sst2"), "train", args.data_dir)[:2048])
    labels = [i % 2 for i in range(len(rows))]
    inputs, target = next(batches(rows, labels, args.batch_size, tokenizer.pad_token_id))
    batch = ({k: v.to(device) for k, v in inputs.items()}, target.to(device))

    contenders = {
        "slash": microtune_step("slash", False, batch, device),
        "dp-slash": microtune_step("slash", True, batch, device),
        "lora": microtune_step("lora", False, batch, device),
        "dp-lora": microtune_step("lora", True, batch, device),
        "bitfit": microtune_step("bitfit", False, batch, device),
        "dp-bitfit": microtune_step("bitfit", True, batch, device),
        "full": microtune_step("full", False, batch, device),
        "dp-full": microtune_step("full", True, batch, device),
        "opacus-dp-bitfit": opacus_bitfit_step(batch, device),
    }
    if args.compare_vmap:
        contenders["dp-full-vmap"] = microtune_step("full", True, batch, device, force_vmap=True)
    for step in contenders.values():  # warm-up
        timed(step, device)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            seconds[name].append(timed(step, device))

    median = {name: statistics.median(values) for name, values in seconds.items()}
    fastest = {name: min(values) for name, values in seconds.items()}
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"tokens={tuple(batch[0]['input_ids'].shape)} rounds={args.rounds}"
    )
    for name, values in seconds.items():
        print(
            f"{name:18s} median {median[name]:.4f} s  "
            f"(min {min(values):.4f}, max {max(values):.4f})"
        )
    # Ratios of medians, and of minima (the steadier figure on a machine shared with others).
    ratios = [
        ("DP-SLaSh / SLaSh", "dp-slash", "slash", "  (goal <= 1.10)"),
        ("DP-LoRA / LoRA", "dp-lora", "lora", ""),
        ("DP-BitFit / BitFit", "dp-bitfit", "bitfit", "  (ghost clipping)"),
        ("DP-full / full", "dp-full", "full", "  (ghost clipping)"),
        ("DP-SLaSh / Opacus DP-BitFit", "dp-slash", "opacus-dp-bitfit", "  (goal <= 0.80)"),
        ("DP-BitFit / Opacus DP-BitFit", "dp-bitfit", "opacus-dp-bitfit", ""),
    ]
    if args.compare_vmap:
        ratios.append(("DP-full torch.func / ghost", "dp-full-vmap", "dp-full", ""))
    for label, a, b, goal in ratios:
        print(
            f"{label:28s} median {median[a] / median[b]:.3f}  "
            f"min {fastest[a] / fastest[b]:.3f}{goal}"
        )


if __name__ == "__main__":
    main()
