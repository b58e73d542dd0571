"""Causal language models as a task type (`--task causal-lm`): prompt tokens out of the loss,
per-example losses, the frozen LM head, merged == unmerged greedy tokens, the stock export,
artifacts, and the CLI from train to export."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import validate_quantization_for_training

from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.cli import main
from microtune.errors import MicrotuneError
from microtune.export.merged import write_merged
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.data import IGNORE_INDEX, batches
from microtune.tasks.examples import rows_to_examples
from microtune.tasks.spec import Example, get_task
from microtune.tasks.types import get_task_type
from microtune.tasks.types.causal import greedy_generate, token_losses
from tests.conftest import TINY_CONFIGS, WORDS, tiny_tokenizer

CAUSAL = get_task_type("causal-lm")
# GPT-2 ties its LM head to the embeddings; this Llama does not (its head is a frozen copy).
MODELS = {"gpt2": True, "llama": False}
MERGEABLE = ("slash", "lora", "bitfit", "pafi")
PROMPTS = [["the", "film", "is"], ["a", "very", "dull", "plot", ",", "not"], ["love"]]


def make_causal_model(model_type: str, folder, tie: bool, seed: int = 0):
    """A random tiny `...ForCausalLM` with the tiny tokenizer ([SEP] as its EOS)."""
    config = TINY_CONFIGS[model_type]()
    config.tie_word_embeddings = tie
    config.initializer_range = 0.2  # logits far enough apart that greedy picks are robust
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def causal_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {t: make_causal_model(t, root / t, tie) for t, tie in MODELS.items()}


def task_model(folder, method: str = "slash", options=None, perturb: float = 0.0, loaded=None):
    """`loaded`: the (model, tokenizer) of `folder`, when the test loaded it already."""
    backbone, tokenizer = loaded or load_backbone(str(folder), auto_class=CAUSAL.auto_class)
    torch.manual_seed(1)  # SLaSh's random start z: fixed, not left to the test order
    model = TaskModel(
        backbone, HeadConfig(1, "tokens"), build_method(method, options), task_type=CAUSAL
    )
    if perturb:  # a trained-looking method: its tensors moved away from their start
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.trainable_state().values():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * perturb)
    return model.eval(), tokenizer


def encoded(tokenizer, pairs=True):
    examples = [
        Example(("the film is", "good"), ()),
        Example(("a very dull plot , not", "fun at all"), ()),
        Example(("love it",), ()) if not pairs else Example(("love", "it ."), ()),
    ]
    return CAUSAL.encode(tokenizer, examples, 64)


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos(causal_dirs):
    model, tokenizer = task_model(causal_dirs["gpt2"])
    rows, labels = encoded(tokenizer)
    prompt = tokenizer("the film is").input_ids  # [CLS] the film is [SEP]
    response = tokenizer("good", add_special_tokens=False).input_ids
    assert rows[0]["input_ids"] == [*prompt, *response, tokenizer.eos_token_id]
    assert labels[0] == [IGNORE_INDEX] * len(prompt) + [*response, tokenizer.eos_token_id]
    # The loss is the cross-entropy of the response (and EOS) tokens alone.
    (inputs, label_batch), *_ = batches(rows[:1], labels[:1], 1, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**inputs)[0]
    targets = torch.tensor(labels[0])
    scored = (targets != IGNORE_INDEX).nonzero().flatten()
    expected = torch.nn.functional.cross_entropy(logits[scored - 1], targets[scored])
    got = CAUSAL.loss(logits[None], label_batch)
    torch.testing.assert_close(got, expected)
    # Plain text: every token is its own label.
    text_rows, text_labels = CAUSAL.encode(tokenizer, [Example(("love it",), ())], 64)
    assert text_labels[0] == text_rows[0]["input_ids"]


@pytest.mark.parametrize("model_type", tuple(MODELS))
def test_per_example_losses_equal_a_one_example_loop(model_type, causal_dirs):
    model, tokenizer = task_model(causal_dirs[model_type], perturb=0.3)
    rows, labels = encoded(tokenizer)
    (inputs, label_batch), *_ = batches(rows, labels, 8, tokenizer.pad_token_id)
    with torch.no_grad():
        together = CAUSAL.loss(model(**inputs), label_batch, reduction="none")
        alone = []
        for row, label in zip(rows, labels, strict=True):
            (one, one_label), *_ = batches([row], [label], 1, tokenizer.pad_token_id)
            alone.append(CAUSAL.loss(model(**one), one_label))
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)
    # The dev loss (logits only at scored positions) is the token mean of the same losses.
    sums, counts = token_losses(model, rows, labels, tokenizer.pad_token_id, 2)
    torch.testing.assert_close(
        torch.tensor(sums) / torch.tensor(counts, dtype=torch.float32),
        together,
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_lm_head_is_the_base_models_and_stays_frozen(causal_dirs):
    for model_type, tied in MODELS.items():
        model, _ = task_model(causal_dirs[model_type], "full")
        counts = model.count_trainable()
        assert counts["head"] == 0 and counts["method"] > 0
        embedding = model.backbone.get_input_embeddings().weight
        assert (model.head.linear.weight is embedding) == tied
        assert not any(n.startswith("head.") for n in model.trainable_state())
    model, _ = task_model(causal_dirs["gpt2"], "linear")
    assert model.count_trainable()["total"] == 0  # api.train refuses this (see the CLI test)


def test_a_tied_head_follows_the_float32_masters_of_a_bfloat16_base(causal_dirs, tmp_path):
    """Full fine-tuning on a bfloat16 GPT-2 trains float32 masters of the embedding, which is
    the LM head: the head computes with the master (and trains through it), as after merging."""
    backbone, tokenizer = load_backbone(
        str(causal_dirs["gpt2"]), dtype="bfloat16", auto_class=CAUSAL.auto_class
    )
    model = TaskModel(backbone, HeadConfig(1, "tokens"), build_method("full"), task_type=CAUSAL)
    assert model.head.linear.weight is model.backbone.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    rows, labels = encoded(tokenizer)
    (inputs, label_batch), *_ = batches(rows, labels, 8, tokenizer.pad_token_id)
    model.train()
    model.loss(model(**inputs), label_batch).backward()  # the head's gradient reaches the master
    master = model.method.masters.tensors["wte-weight"]
    unseen = torch.ones(len(master), dtype=torch.bool)
    unseen[inputs["input_ids"].unique()] = False
    assert master.grad[unseen].abs().sum() > 0  # rows only the head uses
    copy.deepcopy(model)  # the weight the head saw is not part of the module's state

    model.eval()
    prompts = [tokenizer(" ".join(words)).input_ids for words in PROMPTS]
    pad = tokenizer.pad_token_id
    unmerged = greedy_generate(model, prompts, 12, None, pad)
    with torch.no_grad():
        unmerged_logits = model(**inputs)
    model.merge()
    assert greedy_generate(model, prompts, 12, None, pad) == unmerged
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), unmerged_logits, rtol=0, atol=0)
    model.train()
    assert CAUSAL.export_stock(model, {}, tmp_path) and model.training  # its mode is restored


@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("model_type", tuple(MODELS))
def test_merged_model_generates_the_unmerged_greedy_tokens(
    model_type, method, causal_dirs, tmp_path
):
    # Llama has no biases: BitFit creates them, and the merge switches on Llama's bias flags.
    options = {"pafi": {"k": 64}, "bitfit": {"create_missing_biases": True}}.get(method)
    model, tokenizer = task_model(causal_dirs[model_type], method, options, perturb=0.3)
    prompts = [tokenizer(" ".join(words)).input_ids for words in PROMPTS]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    base, _ = task_model(causal_dirs[model_type], method, options)
    unmerged = greedy_generate(model, prompts, 12, None, pad)
    assert unmerged != greedy_generate(base, prompts, 12, None, pad)  # the method matters
    unmerged = greedy_generate(model, prompts, 12, eos, pad)

    export = {"task": {"name": "causal-lm", "label_names": []}, "method": method}
    export["base_model"] = {"name": str(causal_dirs[model_type])}
    assert write_merged(model, tokenizer, export, tmp_path) == "causal-lm"
    assert model.method is None
    assert greedy_generate(model, prompts, 12, eos, pad) == unmerged  # merged in place

    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    for prompt, expected in zip(prompts, unmerged, strict=True):
        out = stock.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )[0, len(prompt) :].tolist()
        assert out[: out.index(eos) if eos in out else None] == expected


def test_artifact_round_trip_gives_the_same_logits(causal_dirs, tmp_path):
    folder = causal_dirs["llama"]
    model, tokenizer = task_model(folder, "lora", perturb=0.3)
    task = CAUSAL.fit_rows(get_task("causal-lm"), [{"prompt": "a", "response": "b"}], None)
    record = {
        "name": task.name,
        "type": task.type,
        "num_labels": 1,
        "metrics": list(task.metrics),
        "text_columns": list(task.text_columns),
        "label_column": "",
        "label_names": [],
        "dev_split": "validation",
    }
    save_artifact(
        tmp_path,
        model,
        method_name="lora",
        base_model=str(folder),
        base_fingerprint=fingerprint(load_backbone(str(folder), auto_class=CAUSAL.auto_class)[0]),
        task=record,
        max_length=64,
        tokenizer=tokenizer,
    )
    config = json.loads((tmp_path / "microtune.json").read_text())
    assert config["parameters"]["stored"]["head"] == 0
    loaded, _, _ = load_artifact(tmp_path)
    rows, labels = encoded(tokenizer)
    (inputs, _), *_ = batches(rows, labels, 8, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


def copy_rows(count: int, seed: int, text: bool = False) -> list[dict]:
    """A toy task in the tiny vocabulary: the response repeats the prompt's last word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS[:20], 3)
        if text:
            rows.append({"text": " ".join([*words, words[-1]])})
        else:
            rows.append({"prompt": " ".join(words), "response": words[-1]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_eval_generate_export_through_the_cli(causal_dirs, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(24, 1))
    dev = write_jsonl(tmp_path / "dev.jsonl", copy_rows(6, 2))
    out = tmp_path / "run"
    argv = [
        "train", "--task", "causal-lm", "--train-file", train, "--dev-file", dev,
        "--output", str(out), "--max-steps", "3", "--batch-size", "8", "--no-progress",
        "--model", str(causal_dirs["gpt2"]), "--method", "slash", "--max-length", "32",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["metrics"]) == ["exact_match", "perplexity", "loss"]
    assert report["trainable_parameters"]["head"] == 0
    config = json.loads((out / "microtune.json").read_text())
    assert config["task"]["type"] == "causal-lm" and config["head"]["readout"] == "tokens"

    assert main(["eval", "--artifact", str(out), "--data-file", dev]) == 0
    assert json.loads(capsys.readouterr().out) == report["metrics"]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", copy_rows(3, 3))
    assert main(["generate", "--artifact", str(out), "--input", prompts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == [r["prompt"] for r in copy_rows(3, 3)]
    assert main(["generate", "--artifact", str(out), "--prompt", "the film"]) == 0
    (one,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert one["prompt"] == "the film" and isinstance(one["response"], str)
    assert main(["predict", "--artifact", str(out), "--input", prompts]) == 2  # generate, not
    assert "microtune generate" in capsys.readouterr().err

    exported = tmp_path / "export"
    many = write_jsonl(tmp_path / "many.jsonl", copy_rows(CAUSAL.export_check_examples + 4, 4))
    argv = ["export", "--artifact", str(out), "--output", str(exported), "--data-file", many]
    assert main(argv) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["format"] == "causal-lm" and check["max_abs_logit_diff"] < 1e-4
    assert check["examples"] == CAUSAL.export_check_examples  # vocabulary-wide logits: capped
    assert type(AutoModelForCausalLM.from_pretrained(exported)).__name__ == "GPT2LMHeadModel"


def test_plain_text_rows_score_perplexity(causal_dirs, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", copy_rows(16, 1, text=True))
    dev = write_jsonl(tmp_path / "dev.jsonl", copy_rows(4, 2, text=True))
    argv = [
        "train", "--task", "causal-lm", "--train-file", train, "--dev-file", dev,
        "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "8",
        "--no-progress", "--model", str(causal_dirs["llama"]), "--method", "slash",
        "--dp-sigma", "0.5", "--dp-batch", "8", "--dp-noise-seed", "1",
    ]  # fmt: skip
    assert main(argv) == 0  # DP-SGD: one loss per example, no head leaves
    report = json.loads(capsys.readouterr().out)
    assert list(report["metrics"]) == ["perplexity", "loss"] and report["epsilon"] > 0
    assert report["metrics"]["perplexity"] == pytest.approx(
        torch.tensor(report["metrics"]["loss"]).exp().item(), rel=1e-5
    )


def test_bad_data_and_a_method_that_trains_nothing_are_one_line_errors(
    causal_dirs, tmp_path, capsys
):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}])
    good = write_jsonl(tmp_path / "good.jsonl", copy_rows(8, 1))
    common = ["--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"]
    common += ["--model", str(causal_dirs["gpt2"])]
    for files, method, message in (
        ((bad, good), "slash", "needs 'prompt' and 'response' columns"),
        ((good, good), "linear", "nothing trains: method 'linear'"),
    ):
        argv = ["train", "--task", "causal-lm", "--train-file", files[0], "--dev-file", files[1]]
        assert main([*argv, *common, "--method", method]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err
    with pytest.raises(MicrotuneError, match="name one or two") as caught:
        CAUSAL.fit_rows(get_task("causal-lm"), copy_rows(1, 1), ("prompt", "response", "x"))
    assert "\n" not in str(caught.value)
    with pytest.raises(MicrotuneError, match="missing column"):  # dev rows of another shape
        task = CAUSAL.fit_rows(get_task("causal-lm"), copy_rows(1, 1), None)
        rows_to_examples(task, [{"text": "a"}], "dev.jsonl")


@pytest.mark.slow
def test_packaged_smollm2_loads_as_a_causal_lm_and_merges_to_the_same_greedy_tokens():
    loaded = load_backbone("smollm2", auto_class=CAUSAL.auto_class)
    # Dequantised: a plain model that transformers' Trainer (TRL's SFTTrainer) takes for training
    validate_quantization_for_training(loaded[0])
    model, tokenizer = task_model("smollm2", "slash", perturb=0.5, loaded=loaded)
    assert type(model.backbone).__name__ == "LlamaModel" and model.count_trainable()["head"] == 0
    prompts = [tokenizer("Review: a gripping film\nSentiment:").input_ids]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    unmerged = greedy_generate(model, prompts, 6, eos, pad)
    model.merge()
    assert greedy_generate(model, prompts, 6, eos, pad) == unmerged
