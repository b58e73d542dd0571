"""The `peft` peers (methods/peers.py) on tiny BERT and Llama: they train, count what peft
counts, merge into stock models, round-trip through artifacts without storing their frozen
projections, and `peft-lora` computes what our `lora` computes."""

import sys

import pytest
import torch
from peft import get_peft_model

from microtune.artifacts.store import load_artifact, read_artifact_config, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint, load_backbone
from microtune.cli import main
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.peers import PEERS, PeftPeer
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.heads import default_readout
from microtune.tasks.spec import get_task
from microtune.tasks.types import loss_fn

from .conftest import tiny_batch
from .test_method_matrix import TINY_OPTIONS  # sizes that fit the tiny models

LABELS = torch.tensor([0, 1, 1, 0])
FAMILIES = ("bert", "llama")
PEER_NAMES = [peer.name for peer in PEERS]
# The peers whose frozen state peft draws or computes (and microtune regenerates).
WITH_FROZEN_STATE = ("peft-vera", "peft-unilora", "peft-tinylora", "peft-shira", "peft-supertuning")
EVERY_PEER = pytest.mark.parametrize("name", PEER_NAMES)
BOTH = pytest.mark.parametrize("family", FAMILIES)
# get_peft_model (for peft's own counts) asks transformers a deprecated question.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def build(folder, name, seed=0, **options):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(seed)
    head = HeadConfig(num_labels=2, readout=default_readout(arch_for(backbone).causal))
    method = build_method(name, {**TINY_OPTIONS.get(name, {}), **options})
    model = TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
    return model.eval(), tokenizer


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tiny_batch(tokenizer, pair=True))


def method_tensors(model):
    return {n: p for n, p in model.trainable_state().items() if not n.startswith("head.")}


def perturb(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


@EVERY_PEER
@BOTH
def test_peer_trains_and_the_loss_moves(name, family, tiny_model_dirs):
    model, tokenizer = build(tiny_model_dirs[family], name)
    tensors = method_tensors(model)
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    before = {n: t.detach().clone() for n, t in tensors.items()}
    # Only the peer trains (the head stays), so a moving loss is the peer's doing.
    optimizer = torch.optim.AdamW(tensors.values(), lr=1e-2, weight_decay=0.0)
    losses = []  # in eval mode: the tiny models' dropout would blur five steps
    for _ in range(5):
        optimizer.zero_grad()
        loss = loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-5, losses  # Uni-LoRA moves slowest: 5e-5 here
    for n, t in tensors.items():
        assert not torch.equal(t, before[n]), f"{n} did not train"


@EVERY_PEER
@BOTH
def test_trainable_count_is_pefts_own(name, family, tiny_model_dirs):
    model, _ = build(tiny_model_dirs[family], name)
    peft_config = model.method._tuner.peft_config["default"]
    reference, _ = load_backbone(str(tiny_model_dirs[family]))
    trainable, _ = get_peft_model(reference, peft_config).get_nb_trainable_parameters()
    assert model.count_trainable()["method"] == trainable > 0


@EVERY_PEER
@BOTH
def test_merge_gives_the_same_logits_and_a_stock_model(name, family, tiny_model_dirs):
    folder = tiny_model_dirs[family]
    stock, _ = load_backbone(str(folder))
    model, tokenizer = build(folder, name)
    perturb(model)
    unmerged = logits(model, tokenizer)
    assert PEERS[PEER_NAMES.index(name)].mergeable
    model.merge()
    assert model.method is None
    torch.testing.assert_close(logits(model, tokenizer), unmerged, rtol=0, atol=1e-5)
    # The stock architecture: same module types, parameter names and attributes, no peft left.
    types = {path: type(m) for path, m in model.backbone.named_modules()}
    assert types == {path: type(m) for path, m in stock.named_modules()}
    assert model.backbone.state_dict().keys() == stock.state_dict().keys()
    assert model.backbone.__dict__.keys() == stock.__dict__.keys()
    assert not any(p.requires_grad for p in model.backbone.parameters())


@EVERY_PEER
@BOTH
def test_artifact_round_trip_stores_only_what_trains(name, family, tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs[family]
    backbone, _ = load_backbone(str(folder))
    base_fingerprint = fingerprint(backbone)
    model, tokenizer = build(folder, name)
    perturb(model)
    expected = logits(model, tokenizer)
    save_artifact(
        tmp_path,
        model,
        method_name=name,
        base_model=str(folder),
        base_fingerprint=base_fingerprint,
        task=task_record(get_task("sst2")),
        max_length=32,
    )
    config = read_artifact_config(tmp_path)
    assert config["parameters"]["stored"] == config["parameters"]["trained"]
    assert ("frozen_fingerprint" in config["method_state"]) == (name in WITH_FROZEN_STATE)
    reloaded, reloaded_tokenizer, _ = load_artifact(tmp_path)
    assert torch.equal(logits(reloaded, reloaded_tokenizer), expected)


@pytest.mark.parametrize("name", WITH_FROZEN_STATE)
def test_frozen_state_regenerates_bit_identically(name, tiny_model_dirs):
    folder = tiny_model_dirs["bert"]
    first, _ = build(folder, name, seed=0)
    # Another --seed draws other trainable inits but must not move the frozen state.
    second, _ = build(folder, name, seed=123)
    frozen = first.method.frozen_state()
    assert frozen and frozen.keys() == second.method.frozen_state().keys()
    for key, tensor in frozen.items():
        assert torch.equal(tensor, second.method.frozen_state()[key]), key
    assert first.method.frozen_fingerprint() == second.method.frozen_fingerprint()
    # The seed option (or, for Super-Tuning, the selection) does change it: not vacuous.
    other = {"select_top": False} if name == "peft-supertuning" else None
    if other is None:
        seed_option = "mask_seed" if name == "peft-shira" else "projection_seed"
        other = {seed_option: 7}
    changed, _ = build(folder, name, **other)
    assert changed.method.frozen_fingerprint() != first.method.frozen_fingerprint()


def test_loading_refuses_a_different_frozen_state(tiny_model_dirs, tmp_path, monkeypatch):
    folder = tiny_model_dirs["bert"]
    backbone, _ = load_backbone(str(folder))
    model, _ = build(folder, "peft-vera")
    save_artifact(
        tmp_path,
        model,
        method_name="peft-vera",
        base_model=str(folder),
        base_fingerprint=fingerprint(backbone),
        task=task_record(get_task("sst2")),
        max_length=32,
    )
    monkeypatch.setattr(PeftPeer, "frozen_fingerprint", lambda self: "sha256:" + "0" * 64)
    with pytest.raises(MicrotuneError, match="peft-vera: the frozen state regenerated"):
        load_artifact(tmp_path)


def test_same_seed_same_init_and_another_seed_another(tiny_model_dirs):
    folder = tiny_model_dirs["bert"]
    for name in ("peft-lora", "peft-unilora"):
        a = method_tensors(build(folder, name, seed=5)[0])
        b = method_tensors(build(folder, name, seed=5)[0])
        c = method_tensors(build(folder, name, seed=6)[0])
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], c[n]) for n in a)


def test_ia3_targets_key_value_and_ffn_output_as_in_its_paper(tiny_model_dirs):
    model, _ = build(tiny_model_dirs["bert"], "peft-ia3")
    from peft.tuners.ia3 import IA3Layer

    layers = {
        path: module.is_feedforward
        for path, module in model.backbone.named_modules()
        if isinstance(module, IA3Layer)
    }
    expected = {}
    for block in range(2):
        prefix = f"encoder.layer.{block}."
        expected[prefix + "attention.self.key"] = False
        expected[prefix + "attention.self.value"] = False
        expected[prefix + "output.dense"] = True  # not attention.output.dense
    assert layers == expected


def test_peft_lora_computes_what_our_lora_computes(tiny_model_dirs):
    """With our LoRA's A and the same B, peft's LoRA gives our logits, unmerged and merged,
    and the same steps of AdamW keep them together (as bench/peft_lora.py showed)."""
    folder = tiny_model_dirs["bert"]
    options = {"rank": 4, "alpha": 8.0}
    ours, tokenizer = build(folder, "lora", **options)
    theirs, _ = build(folder, "peft-lora", **options)
    torch.testing.assert_close(theirs.head.linear.weight, ours.head.linear.weight, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for path, factors in zip(
            ours.method.target_paths(), ours.method.factors.values(), strict=True
        ):
            layer = theirs.backbone.get_submodule(path)
            factors.B.copy_(torch.randn(factors.B.shape, generator=generator) * 0.1)
            layer.lora_A["default"].weight.copy_(factors.A)
            layer.lora_B["default"].weight.copy_(factors.B)
    torch.testing.assert_close(logits(theirs, tokenizer), logits(ours, tokenizer))
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW(model.trainable_state().values(), lr=1e-2)
        for _ in range(3):  # in eval mode: dropout masks would differ between the two
            optimizer.zero_grad()
            loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS).backward()
            optimizer.step()
    torch.testing.assert_close(logits(theirs, tokenizer), logits(ours, tokenizer))
    trained = logits(ours, tokenizer)
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(logits(theirs, tokenizer), trained, rtol=0, atol=1e-5)


def test_missing_peft_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    for name in PEER_NAMES:
        with pytest.raises(MicrotuneError) as error:
            build_method(name)
        message = str(error.value)
        assert "\n" not in message
        assert name in message and "pip install 'microtune[peft]'" in message


def test_bad_settings_are_one_line_errors(tiny_model_dirs):
    folder = tiny_model_dirs["bert"]
    with pytest.raises(MicrotuneError, match="peft-vera: target 'nothing' matches no layer"):
        build(folder, "peft-vera", target_modules="nothing")
    # SHiRA's r (in + out) entries cannot exceed the weight's: peft's refusal, as one line.
    with pytest.raises(MicrotuneError, match="peft-shira: peft refused this setting") as error:
        build(folder, "peft-shira", rank=64)
    assert "\n" not in str(error.value)
    with pytest.raises(MicrotuneError, match="not among the targets"):
        build(folder, "peft-ia3", target_modules="key,value", feedforward_modules="output.dense")
    with pytest.raises(MicrotuneError, match="sparsity must be in"):
        build_method("peft-supertuning", {"sparsity": 1.0})


def test_a_peer_trains_from_the_command_line(tiny_model_dirs, toy_files, tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["train", "--task", "sst2", "--method", "peft-unilora", "--theta-d-length", "512"]
    argv += ["--model", str(tiny_model_dirs["llama"]), "--output", str(output)]
    argv += [
        "--train-file",
        str(toy_files / "train.jsonl"),
        "--dev-file",
        str(toy_files / "dev.jsonl"),
    ]
    assert main([*argv, "--max-steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    config = read_artifact_config(output)
    assert config["method_config"]["theta_d_length"] == 512
    assert config["parameters"]["trained"]["method"] == 512
    model, tokenizer, _ = load_artifact(output)
    unmerged = logits(model, tokenizer)
    model.merge()
    torch.testing.assert_close(logits(model, tokenizer), unmerged, rtol=0, atol=1e-5)
