"""microtune's methods as peft tuners (`microtune.peft`): peft, transformers' Trainer, TRL.

Each test runs the real stack on the tiny random BERT of conftest (and a tiny Llama for TRL):
`get_peft_model`, a few `Trainer` steps with checkpoints and a resume, `save_pretrained` /
`PeftModel.from_pretrained`, and `merge_and_unload`.
"""

from __future__ import annotations

import random
from pathlib import Path

import peft.mapping
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

import microtune
import microtune.peft as mpeft
from microtune.errors import MicrotuneError
from microtune.peft import registry
from microtune.tasks.types.causal import greedy_generate
from tests.conftest import TINY_CONFIGS, WORDS, decoder_tokenizer, make_tiny_model

# Small options so that a few steps move each method visibly on the tiny BERT.
CONFIGS = {
    "slash": lambda: mpeft.SlashConfig(task_type="SEQ_CLS", d=16),
    "hiwi": lambda: mpeft.HiWiConfig(task_type="SEQ_CLS", r=2),
    "pafi": lambda: mpeft.PaFiConfig(task_type="SEQ_CLS", k=50),
    "jrwarp": lambda: mpeft.JRWarpConfig(task_type="SEQ_CLS", d=16),
}
# What each method trains besides the head, by its name in the saved adapter.
# HiWi: per block A (n, r) and B (r, n) on b1 (n = 48) and b2 (n = 32), r = 2.
METHOD_NUMBERS = {"slash": 16, "hiwi": 2 * (2 * 48 * 2 + 2 * 32 * 2), "pafi": 50, "jrwarp": 16}
MERGEABLE = ("slash", "hiwi", "pafi")
POSITIVE = {"good", "great", "fun", "best", "love"}


@pytest.fixture(scope="module")
def bert(tiny_model_dirs) -> Path:
    return tiny_model_dirs["bert"]


@pytest.fixture(scope="module")
def rows(bert) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(bert)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        words = rng.sample(WORDS, 5)
        label = int(bool(POSITIVE & set(words)))
        rows.append({**tokenizer(" ".join(words)), "labels": label})
    return rows


def collator(bert: Path) -> DataCollatorWithPadding:
    return DataCollatorWithPadding(AutoTokenizer.from_pretrained(bert))


def batch(bert: Path, rows: list[dict]) -> dict[str, torch.Tensor]:
    inputs = collator(bert)(rows[:6])
    inputs.pop("labels")
    return inputs


def base_model(bert: Path):
    torch.manual_seed(0)  # the new classifier head: the same in every run
    return AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)


def peft_model(bert: Path, method: str):
    return get_peft_model(base_model(bert), CONFIGS[method]())


def arguments(output: Path, steps: int = 4) -> TrainingArguments:
    return TrainingArguments(
        output,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.detach().clone()


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in get_peft_model_state_dict(model).items()}


def train(bert: Path, rows: list[dict], method: str, output: Path, resume: Path | None = None):
    model = peft_model(bert, method)
    trainer = Trainer(
        model=model,
        args=arguments(output),
        train_dataset=rows,
        data_collator=collator(bert),
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_the_method_and_the_head_train(bert, method, capsys):
    model = peft_model(bert, method)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = {n: k for n, k in trainable.items() if ".classifier.modules_to_save." in n}
    own = {n: k for n, k in trainable.items() if f".microtune_{method}." in n}
    assert set(trainable) == set(head) | set(own), sorted(trainable)
    assert sum(head.values()) == 32 * 2 + 2
    assert sum(own.values()) == METHOD_NUMBERS[method]
    model.print_trainable_parameters()
    assert f"trainable params: {sum(trainable.values())} " in capsys.readouterr().out


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainer_changes_logits_and_checkpoints_only_the_adapter(bert, rows, method, tmp_path):
    before = logits(peft_model(bert, method), batch(bert, rows))
    model = train(bert, rows, method, tmp_path)
    assert (logits(model, batch(bert, rows)) - before).abs().max() > 1e-3
    checkpoint = tmp_path / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    saved = adapter_tensors(model)
    assert all(
        n.startswith(f"base_model.microtune_{method}.") or ".classifier." in n for n in saved
    )
    base_bytes = (bert / "model.safetensors").stat().st_size
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 10


@pytest.mark.parametrize("method", list(CONFIGS))
def test_resume_continues_bit_identically(bert, rows, method, tmp_path):
    straight = train(bert, rows, method, tmp_path / "straight")
    resumed = train(
        bert, rows, method, tmp_path / "resumed", resume=tmp_path / "straight" / "checkpoint-2"
    )
    expected, found = adapter_tensors(straight), adapter_tensors(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[name], found[name]) for name in expected)


@pytest.fixture(scope="module")
def trained(bert, rows, tmp_path_factory) -> dict[str, Path]:
    """Each method trained for 4 steps and saved with `save_pretrained`."""

    class Trained(dict):
        def __missing__(self, method: str) -> Path:
            folder = tmp_path_factory.mktemp(f"trained-{method}")
            train(bert, rows, method, folder / "run").save_pretrained(folder / "adapter")
            self[method] = folder / "adapter"
            return self[method]

    return Trained()


def loaded(bert: Path, folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(base_model(bert), folder)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_and_from_pretrained_give_identical_logits(bert, rows, trained, method, tmp_path):
    model = loaded(bert, trained[method])
    inputs = batch(bert, rows)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(loaded(bert, tmp_path), inputs), expected)
    # A random head would give other logits: the head came from the adapter folder.
    assert not torch.allclose(logits(base_model(bert), inputs), expected)


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_unload_gives_a_stock_model_with_the_same_logits(bert, rows, trained, method):
    inputs = batch(bert, rows)
    unmerged = logits(loaded(bert, trained[method]), inputs)
    merged = loaded(bert, trained[method]).merge_and_unload()
    assert type(merged) is type(base_model(bert))
    names = [name for name, _ in merged.named_parameters()]
    assert not any("microtune" in name or "modules_to_save" in name for name in names)
    merge_error = (logits(merged, inputs) - unmerged).abs().max()
    assert merge_error <= 1e-5
    # The method really acts: the same head without it gives other logits, by far more than
    # the merge's rounding (HiWi's B starts at zero, so 4 steps move it least).
    unloaded = loaded(bert, trained[method]).unload()
    assert (logits(unloaded, inputs) - unmerged).abs().max() > max(1e-5, 10 * merge_error)


def test_jrwarp_refuses_to_merge_in_one_line(bert, trained):
    model = loaded(bert, trained["jrwarp"])
    with pytest.raises(MicrotuneError, match="'jrwarp' cannot be merged") as error:
        model.merge_and_unload()
    assert "\n" not in str(error.value)


def test_an_adapter_refuses_another_base(trained, tmp_path):
    other = make_tiny_model("bert", tmp_path / "other", seed=1)
    base = AutoModelForSequenceClassification.from_pretrained(other, num_labels=2)
    with pytest.raises(MicrotuneError, match="base model mismatch"):
        PeftModel.from_pretrained(base, trained["slash"])


def test_registration_refuses_a_peft_without_registries(monkeypatch):
    monkeypatch.delattr(peft.mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(MicrotuneError) as error:
        registry.register()
    message = str(error.value)
    assert "PEFT_TYPE_TO_PREFIX_MAPPING" in message and "peft>=0.21,<0.22" in message
    assert "\n" not in message


def test_registration_refuses_a_name_peft_already_uses(monkeypatch):
    monkeypatch.setitem(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "MICROTUNE_SLASH", LoraConfig)
    with pytest.raises(
        MicrotuneError, match="already has a method registered as 'MICROTUNE_SLASH'"
    ):
        registry.register()


def test_registration_runs_again_harmlessly():
    registry.register()  # our own entries: nothing to do
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["MICROTUNE_SLASH"] is mpeft.SlashConfig


def test_bad_options_are_one_line_errors():
    with pytest.raises(MicrotuneError, match="position 'middle' unknown"):
        mpeft.SlashConfig(position="middle")


# -- TRL --------------------------------------------------------------------------------------


def test_trl_sft_trainer_takes_a_slash_config_and_the_loss_falls(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    tokenizer = decoder_tokenizer(eos_appended=True)
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["the film is good and the story is fun", "a very dull plot , not fun"]
    data = Dataset.from_list([{"text": text} for text in texts] * 8)
    args = SFTConfig(
        tmp_path,
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=0.2,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    config = mpeft.SlashConfig(task_type="CAUSAL_LM", d=16)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.microtune_slash.default.z"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses


# -- round trip into microtune ------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_peft_folder_loads_as_a_microtune_artifact_with_equal_logits(
    bert, trained, method, tmp_path
):
    report = mpeft.to_artifact(trained[method], tmp_path / "artifact", label_names=["no", "yes"])
    assert report["parameters"]["method"] == METHOD_NUMBERS[method]
    texts = ["the film is good", "a very dull plot , not fun", "love it"]
    tokenizer = AutoTokenizer.from_pretrained(bert)
    expected = logits(
        loaded(bert, trained[method]), tokenizer(texts, return_tensors="pt", padding=True)
    )
    tuned = microtune.load(tmp_path / "artifact")
    assert tuned.label_names == ["no", "yes"]
    torch.testing.assert_close(tuned.logits(texts), expected, rtol=0, atol=1e-5)


def test_to_artifact_refuses_another_base(trained, tmp_path):
    other = make_tiny_model("bert", tmp_path / "other", seed=1)
    with pytest.raises(MicrotuneError, match="base model mismatch"):
        mpeft.to_artifact(trained["slash"], tmp_path / "artifact", model=str(other))


def test_to_artifact_refuses_a_lora_folder(bert, tmp_path):
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2)
    get_peft_model(base_model(bert), config).save_pretrained(tmp_path / "lora")
    with pytest.raises(MicrotuneError, match="holds a peft LORA adapter, not a microtune method"):
        mpeft.to_artifact(tmp_path / "lora", tmp_path / "artifact")


def test_a_causal_lm_adapter_converts_to_a_causal_lm_artifact_with_equal_greedy_tokens(
    tmp_path,
):
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True  # the LM head is the saved embedding, not a random one
    config.initializer_range = 0.2  # logits far enough apart that greedy picks are robust
    decoder = make_tiny_model(
        "llama", tmp_path / "llama", config=config, tokenizer=decoder_tokenizer()
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(decoder),
        mpeft.SlashConfig(task_type="CAUSAL_LM", d=16),
    )
    with torch.no_grad():  # a trained-looking z
        model.base_model.microtune_slash.default.z.add_(torch.randn(16) * 0.5)
    model.save_pretrained(tmp_path / "adapter")
    report = mpeft.to_artifact(tmp_path / "adapter", tmp_path / "artifact", max_length=32)
    assert report["parameters"]["method"] == 16
    tuned = microtune.load(tmp_path / "artifact")
    assert tuned.config["task"]["type"] == "causal-lm"
    assert tuned.config["task"]["text_columns"] == ["prompt", "response"]
    prompts = [tuned.tokenizer(p).input_ids for p in ("the film is", "a very dull plot , not")]
    model.eval().generation_config.eos_token_id = None  # six tokens each, EOS or not
    model.generation_config.pad_token_id = tuned.tokenizer.pad_token_id
    for ids in prompts:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        [got] = greedy_generate(tuned.task_model, [ids], 6, None, tuned.tokenizer.pad_token_id)
        assert got == expected
    # microtune generate (the CLI's path): the same tokens as text, up to EOS
    [answer] = tuned.generate("the film is", max_new_tokens=6)
    assert isinstance(answer["response"], str)


def test_a_second_adapter_and_switching_off_are_refused(bert):
    model = peft_model(bert, "slash")
    with pytest.raises(MicrotuneError, match="one microtune adapter per model"):
        model.add_adapter("other", mpeft.SlashConfig(task_type="SEQ_CLS", d=8))
    with pytest.raises(MicrotuneError, match="cannot be switched off"), model.disable_adapter():
        pass


def test_a_routed_method_refuses_inputs_embeds(bert, rows):
    model = peft_model(bert, "pafi")
    embeds = torch.zeros(2, 5, 32)
    with pytest.raises(MicrotuneError, match="pass input_ids, not inputs_embeds"):
        model(inputs_embeds=embeds, attention_mask=torch.ones(2, 5, dtype=torch.long))
