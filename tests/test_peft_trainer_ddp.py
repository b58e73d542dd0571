"""transformers' `Trainer` with `SlashConfig` under a real `torchrun --nproc-per-node 2` (gloo,
CPU): `examples/peft_trainer_ddp.py` launched as a user launches it, on the tiny random BERT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import microtune.peft  # noqa: F401  registers SLaSh with peft for from_pretrained
from tests.test_distributed import TIMEOUT_S, _env, _free_port

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "peft_trainer_ddp.py"
PROBE = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie"]
STEPS = 8


def test_two_ranks_train_slash_with_the_trainer_and_save_an_adapter(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["bert"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    args = [str(SCRIPT), "--model", str(base), "--output", str(tmp_path), "--steps", str(STEPS)]
    try:
        done = subprocess.run(
            [*launcher, *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not end within {TIMEOUT_S} s (a hang)")
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {(r["world_size"], r["backend"], r["steps"]) for r in ranks} == {(2, "gloo", STEPS)}
    # Each rank trained on its own half of every batch; the all-reduced gradients keep z and
    # the head bit-identical on both.
    assert ranks[0]["trained_sha256"] == ranks[1]["trained_sha256"]

    tokenizer = AutoTokenizer.from_pretrained(base)
    probe = tokenizer(PROBE, padding=True, return_tensors="pt")
    torch.manual_seed(0)  # the classifier head the script started from
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    with torch.no_grad():
        before = plain(**probe).logits
        loaded = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
        after = loaded(**probe).logits
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MICROTUNE_SLASH"
    torch.testing.assert_close(after, torch.load(tmp_path / "logits.pt"), rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # it trained: z and the head moved
