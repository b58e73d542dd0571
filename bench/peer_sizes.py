"""Trained numbers of each `peft` peer on the packaged MiniLM, at peft's defaults and at the
preset that brings it near issue 10's class of peers with at most 10K trained numbers.

Each row builds the peer on a fresh backbone twice: as a microtune method (the count is what
the optimizer updates besides the head) and with peft's own `get_peft_model` on the same
peft config (`get_nb_trainable_parameters`); the two must agree. At the preset it also moves
the peer's tensors off their start (noise of 0.05) and prints how far the merged model's
logits are from the unmerged ones on a few sentences.

    python bench/peer_sizes.py
"""

from __future__ import annotations

import warnings

import torch
from peft import get_peft_model

from microtune.backbone.load import load_backbone
from microtune.common.choices import DEFAULT_MODEL
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel

# name -> the 10K-class preset (options), where the peer's design allows one.
PRESETS = {
    "peft-lora": {"rank": 1},
    "peft-vera": {},  # peft's default r = 256 is already 7,680
    "peft-ia3": {"target_modules": "key,value"},  # no size option: fewer targets
    "peft-unilora": {"theta_d_length": 8192},
    "peft-tinylora": {"u": 768},
    "peft-shira": {"rank": 1},
    "peft-supertuning": {"sparsity": 0.995},
}


SENTENCES = ["a gripping, funny film", "the plot is dull and the actors are worse", "not bad"]


def counts(name: str, options: dict) -> tuple[int, int, TaskModel, object]:
    """(microtune's trained numbers besides the head, peft's own count on the same config,
    the task model, its tokenizer)."""
    backbone, tokenizer = load_backbone(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = TaskModel(backbone, HeadConfig(num_labels=2), build_method(name, options)).eval()
    ours = model.count_trainable()["method"]
    peft_config = model.method._tuner.peft_config["default"]
    reference, _ = load_backbone(DEFAULT_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(reference, peft_config).get_nb_trainable_parameters()[0]
    return ours, theirs, model, tokenizer


@torch.no_grad()
def merge_gap(model: TaskModel, tokenizer) -> float:
    """max |merged - unmerged| logit after moving every trained tensor by N(0, 0.05²) noise."""
    generator = torch.Generator().manual_seed(1)
    for parameter in model.trainable_state().values():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    unmerged = model(**batch)
    model.merge()
    return (model(**batch) - unmerged).abs().max().item()


def main() -> None:
    print(f"model={DEFAULT_MODEL}")
    header = f"{'peer':18}{'default':>10}{'peft':>10}   {'preset':30}{'trained':>9}{'peft':>9}"
    print(header + f"{'merge gap':>11}")
    for name, preset in PRESETS.items():
        default, default_peft, _, _ = counts(name, {})
        sized, sized_peft, model, tokenizer = counts(name, preset)
        shown = ", ".join(f"{k}={v}" for k, v in preset.items()) or "(default)"
        row = f"{name:18}{default:>10,}{default_peft:>10,}   {shown:30}{sized:>9,}{sized_peft:>9,}"
        print(row + f"{merge_gap(model, tokenizer):>11.1e}")


if __name__ == "__main__":
    main()
