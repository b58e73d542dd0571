"""Every registered method × every mapped architecture: the contract each method must keep.

Methods join automatically from `microtune.methods.METHODS`. Per pair: it attaches and runs,
an optimizer step moves only trainable tensors, an artifact reloads to bit-identical logits,
and a mergeable method folds away exactly into a stock `transformers` model (a non-mergeable
one must refuse to merge instead).

The task-type axis (at the end): each task type on every family with one cheap method, and
every method on an encoder and two decoders, merged and exported.
"""

import dataclasses

import pytest
import torch
from transformers import AutoModel

from microtune.api import artifact_summary, load_exported
from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint, load_backbone
from microtune.errors import MicrotuneError
from microtune.export.merged import write_merged
from microtune.methods import METHODS, build_method
from microtune.methods.slash import SLaSh, site_part
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.heads import default_readout
from microtune.tasks.spec import Task, get_task
from microtune.tasks.types import get_task_type, loss_fn

from .conftest import FAMILY_TYPES, TINY_CONFIGS, tiny_batch
from .test_causal_lm import make_causal_model

# Options that keep a method small on the tiny models; methods not listed use their defaults.
TINY_OPTIONS = {
    "slash": {"d": 16},
    "jrwarp": {"d": 16},
    "lora": {"rank": 4},
    "pafi": {"k": 0.01},
    "hiwi": {"r": 4},
    # The peft peers (test_peers.py checks them in depth); SHiRA's default r = 32 would ask
    # for more entries than a 32 x 32 weight has.
    "peft-vera": {"rank": 16},
    "peft-unilora": {"theta_d_length": 512},
    "peft-tinylora": {"u": 32},
    "peft-shira": {"rank": 2},
    "peft-supertuning": {"sparsity": 0.9},
}
# Per-architecture options where a method's default cannot apply (HiWi's bias variant needs
# FFN biases, which Llama lacks; test_pafi_hiwi.py checks the refusal).
ARCH_OPTIONS = {("hiwi", "llama"): {"variant": "weight"}}
# The other families whose FFN has no biases (ModernBERT by default, the Llama-like decoders).
NO_FFN_BIAS = ("modernbert", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
ARCH_OPTIONS.update({("hiwi", model_type): {"variant": "weight"} for model_type in NO_FFN_BIAS})
# Pairs a method refuses with a one-line error instead of attaching (peft's SHiRA and
# Super-Tuning adapt only nn.Linear; GPT-2's layers are Conv1D): checked here, then skipped.
REFUSED = {("peft-shira", "gpt2"): "only nn.Linear", ("peft-supertuning", "gpt2"): "only nn.Linear"}
METHOD_NAMES = sorted(METHODS)
LABELS = torch.tensor([0, 1, 1, 0])
# BitFit on Llama (no biases) warns that only the head trains; test_baselines.py checks that.
pytestmark = pytest.mark.filterwarnings("ignore:bitfit.*no biases:UserWarning")
MATRIX = pytest.mark.parametrize("model_type", FAMILY_TYPES)
EVERY_METHOD = pytest.mark.parametrize("method_name", METHOD_NAMES)


def build(method_name: str, folder):
    """(task model in eval mode, tokenizer, base fingerprint) for one method on one model; None
    where the method refuses the model (the refusal and its message are asserted here)."""
    backbone, tokenizer = load_backbone(str(folder))
    base_fingerprint = fingerprint(backbone)
    torch.manual_seed(0)
    options = {
        **TINY_OPTIONS.get(method_name, {}),
        **ARCH_OPTIONS.get((method_name, backbone.config.model_type), {}),
    }
    method = build_method(method_name, options)
    head = HeadConfig(num_labels=2, readout=default_readout(arch_for(backbone).causal))
    refusal = REFUSED.get((method_name, backbone.config.model_type))
    if refusal:
        with pytest.raises(MicrotuneError, match=refusal):
            TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
        return None
    model = TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
    return model.eval(), tokenizer, base_fingerprint


def every_tensor(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of all parameters and buffers (non-persistent ones included)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items()}


def perturb(model: TaskModel, include_head: bool = True) -> None:
    """Move every trainable tensor off its initial value (LoRA's B, for one, starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.trainable_state().items():
            if include_head or not name.startswith("head."):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise.to(parameter.dtype) * 0.05)


def logits(model: TaskModel, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_batch(tokenizer, pair=True))


@MATRIX
@EVERY_METHOD
def test_attach_and_forward(method_name, model_type, tiny_model_dirs):
    built = build(method_name, tiny_model_dirs[model_type])
    if built is None:
        return  # a refusal, asserted in build
    model, tokenizer, _ = built
    out = logits(model, tokenizer)
    assert out.shape == (4, 2)
    assert torch.isfinite(out).all()
    trainable = model.trainable_state()
    assert {"head.linear.weight", "head.linear.bias"} <= set(trainable)
    counts = model.count_trainable()
    assert counts["total"] == sum(p.numel() for p in trainable.values())


@MATRIX
@EVERY_METHOD
def test_one_step_changes_only_trainable_tensors(method_name, model_type, tiny_model_dirs):
    built = build(method_name, tiny_model_dirs[model_type])
    if built is None:
        return  # a refusal, asserted in build
    model, tokenizer, _ = built
    trainable = model.trainable_state()
    before = every_tensor(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS).backward()
    optimizer.step()

    after = every_tensor(model)
    assert set(after) == set(before)
    for name, value in after.items():
        if name in trainable:
            gradient = trainable[name].grad
            if gradient is not None and gradient.abs().sum() > 0:
                assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert not torch.equal(after["head.linear.weight"], before["head.linear.weight"])


@MATRIX
@EVERY_METHOD
def test_artifact_round_trip_is_bit_identical(method_name, model_type, tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs[model_type]
    built = build(method_name, folder)
    if built is None:
        return  # a refusal, asserted in build
    model, tokenizer, base_fingerprint = built
    perturb(model)
    expected = logits(model, tokenizer)
    save_artifact(
        tmp_path,
        model,
        method_name=method_name,
        base_model=str(folder),
        base_fingerprint=base_fingerprint,
        task=task_record(get_task("sst2")),
        max_length=32,
    )
    reloaded, reloaded_tokenizer, config = load_artifact(tmp_path)
    assert config["method"] == method_name
    assert torch.equal(logits(reloaded, reloaded_tokenizer), expected)
    summary = artifact_summary(tmp_path)
    assert summary["trainable_parameters"] == model.count_trainable()
    assert summary["stored_parameters"] == model.count_stored()
    assert summary["mergeable"] is METHODS[method_name].mergeable
    assert 0 < summary["tensor_bytes"] < summary["artifact_bytes"]


def folds_into_a_bias_no_stock_model_has(model: TaskModel) -> bool:
    """SLaSh whose site has no bias and no config flag to add one (the FFN output of Mistral,
    Qwen2/3, Gemma 1-3, Phi-3): no stock model can carry the folded shift, so merging refuses
    (the artifact still serves unmerged)."""
    if not isinstance(model.method, SLaSh):
        return False
    part = site_part(model.arch, model.method.config.position)
    site = model.arch.block_part(model.backbone, 0, part)
    return site.bias is None and part not in model.arch.bias_flags


@MATRIX
@EVERY_METHOD
def test_merge_is_exact_and_gives_a_stock_model(method_name, model_type, tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs[model_type]
    built = build(method_name, folder)
    if built is None:
        return  # a refusal, asserted in build
    model, tokenizer, _ = built
    if not METHODS[method_name].mergeable:
        with pytest.raises(MicrotuneError, match="cannot be merged"):
            model.merge()
        return
    before_training = logits(model, tokenizer)
    perturb(model, include_head=False)
    unmerged = logits(model, tokenizer)
    if folds_into_a_bias_no_stock_model_has(model):
        weights = every_tensor(model.backbone)
        with pytest.raises(MicrotuneError, match="has no bias and no config flag.*unmerged"):
            model.merge()
        # Refused before touching anything: the unmerged model still serves, unchanged.
        assert all(torch.equal(t, weights[n]) for n, t in every_tensor(model.backbone).items())
        assert torch.equal(logits(model, tokenizer), unmerged)
        return
    if model.count_trainable()["method"]:
        # Otherwise parity below would hold for a method that does nothing at all.
        assert (unmerged - before_training).abs().max() > 1e-4

    model.merge()
    merged = logits(model, tokenizer)
    assert model.method is None
    assert (unmerged - merged).abs().max().item() <= 1e-5

    base, _ = load_backbone(str(folder))
    backbone = model.backbone
    assert [type(m) for m in backbone.modules()] == [type(m) for m in base.modules()]
    base_names, merged_names = set(base.state_dict()), set(backbone.state_dict())
    if merged_names != base_names:
        # Only where a merge must create biases (Llama), announced by the config's bias flags.
        arch = arch_for(base)
        assert arch.bias_flags, f"merge changed parameter names: {merged_names ^ base_names}"
        assert base_names < merged_names
        assert all(name.endswith(".bias") for name in merged_names - base_names)
        assert any(getattr(backbone.config, flag) for flag in arch.bias_flags.values())

    # A stock model class loads the merged weights and computes the same function.
    batch = tiny_batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    backbone.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = backbone(**inputs).last_hidden_state
        assert torch.equal(reloaded(**inputs).last_hidden_state, expected)


@EVERY_METHOD
def test_every_method_is_listed_with_a_learning_rate(method_name):
    from microtune.cli import run

    info = run(["info"])["methods"][method_name]
    assert info["mergeable"] is METHODS[method_name].mergeable
    assert 0 < info["default_lr"] < 1


# -- the task-type axis ------------------------------------------------------------------------
# test_task_types.py trains every method on bert and llama for the sentence and token types
# (steps, round trip, merge parity) and test_causal_lm.py checks greedy generation after merges.
# Here each cell merges, exports (`write_merged`: the type's stock class where it computes the
# same function, else backbone + head) and reloads the folder as a deployment would: merged and
# exported outputs equal the unmerged ones, right- and left-padded; or the refusal, with its
# reason. Cells: every family with LoRA per task type, and every method on BERT and Llama (the
# layout of SmolLM2).
KINDS = ("classification", "regression", "token-classification", "causal-lm")
DECODER_TYPES = tuple(t for t in FAMILY_TYPES if arch_for(t).causal)
AXIS_TEXTS = ["the film is good", "a very dull plot , not fun", "love it"]


def kind_task(kind: str) -> Task:
    """The user-file task of a type, with a label set where its labels come from the data."""
    task = get_task(kind)
    names = {
        "classification": ("neg", "neu", "pos"),
        "token-classification": ("O", "B-PER", "I-PER", "B-LOC"),
    }.get(kind)
    return dataclasses.replace(task, num_labels=len(names), label_names=names) if names else task


@pytest.fixture(scope="module")
def causal_model_dirs(tmp_path_factory):
    """model type -> folder of a tiny `...ForCausalLM` (with its LM head), built on first use."""
    root = tmp_path_factory.mktemp("causal-families")

    class Dirs(dict):
        def __missing__(self, model_type):
            folder = self[model_type] = make_causal_model(model_type, root / model_type, True)
            return folder

    return Dirs()


def build_for_kind(kind: str, method_name: str, folder):
    """(task model of the type, moved off its initial values, in eval mode; tokenizer; task)."""
    task, task_type = kind_task(kind), get_task_type(kind)
    backbone, tokenizer = load_backbone(str(folder), auto_class=task_type.auto_class)
    model_type = backbone.config.model_type
    causal = arch_for(model_type).causal
    readout = task_type.readout(None, default_readout(causal))
    head = HeadConfig(task.num_labels, readout, bias=task_type.default_head_bias(readout, causal))
    options = {
        **TINY_OPTIONS.get(method_name, {}),
        **ARCH_OPTIONS.get((method_name, model_type), {}),
    }
    torch.manual_seed(0)
    method = build_method(method_name, options)
    model = TaskModel(backbone, head, method, tokenizer.mask_token_id, task_type=task_type)
    perturb(model)
    return model.eval(), tokenizer, task


def padded_inputs(model: TaskModel, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """side -> AXIS_TEXTS padded on that side by the tokenizer."""
    inputs = {}
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(AXIS_TEXTS, padding=True, return_tensors="pt")
        keys = ["input_ids", "attention_mask"] + ["token_type_ids"] * model.arch.token_type_ids
        inputs[side] = {k: batch[k] for k in keys}
    tokenizer.padding_side = "right"
    return inputs


def assert_same_outputs(got: torch.Tensor, expected: torch.Tensor, mask, what: str) -> None:
    """Equal within 1e-5 of the largest output (at least 1); per-token outputs are compared at
    real tokens only (a left-padded decoder's leading pads attend to nothing)."""
    if expected.dim() == 3:
        got, expected = got[mask.bool()], expected[mask.bool()]
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    assert (got.float() - expected).abs().max().item() <= bound, what


def check_task_type_cell(kind: str, method_name: str, folder, output) -> str | None:
    """One cell of the axis; returns the export format, or None where the merge is refused."""
    model, tokenizer, task = build_for_kind(kind, method_name, folder)
    inputs = padded_inputs(model, tokenizer)
    with torch.no_grad():
        unmerged = {side: model(**batch) for side, batch in inputs.items()}
    if not METHODS[method_name].mergeable:
        with pytest.raises(MicrotuneError, match="cannot be merged"):
            model.merge()
        return None
    if folds_into_a_bias_no_stock_model_has(model):
        with pytest.raises(MicrotuneError, match="has no bias and no config flag.*unmerged"):
            model.merge()
        return None
    config = {"task": task_record(task), "method": method_name, "base_model": {"name": "x"}}
    export_format = write_merged(model, tokenizer, config, output)
    assert model.method is None
    forward, _ = load_exported(output)
    with torch.no_grad():
        for side, batch in inputs.items():
            mask = batch["attention_mask"]
            assert_same_outputs(model(**batch), unmerged[side], mask, f"merged, {side}")
            assert_same_outputs(forward(**batch), unmerged[side], mask, f"exported, {side}")
    return export_format


# No stock token-classification class (OPT, Gemma 3), or one with a layer before its linear
# (ModernBERT's prediction head): exported as backbone + head.
NO_STOCK_TOKEN_CLASS = ("modernbert", "opt", "gemma3_text")


def expected_format(kind: str, model_type: str) -> str:
    """The export format a cell must write."""
    if kind == "causal-lm":
        return "causal-lm"
    if kind == "token-classification":
        return "backbone+head" if model_type in NO_STOCK_TOKEN_CLASS else kind
    # A sentence head: the stock class for decoders (last token, bias-free head); encoders read
    # the mean (the default), which no stock class does: a sentence-transformers folder.
    return "sequence-classification" if arch_for(model_type).causal else "sentence-transformers"


def axis_folder(kind: str, model_type: str, tiny_model_dirs, causal_model_dirs):
    return (causal_model_dirs if kind == "causal-lm" else tiny_model_dirs)[model_type]


# Classification exports as regression does (test_sequence_export.py runs it on every decoder).
FAMILY_CELLS = [
    (kind, model_type)
    for kind in KINDS[1:]
    for model_type in (DECODER_TYPES if kind == "causal-lm" else FAMILY_TYPES)
]


@pytest.mark.parametrize(("kind", "model_type"), FAMILY_CELLS)
def test_each_task_type_on_every_family(
    kind, model_type, tiny_model_dirs, causal_model_dirs, tmp_path
):
    """LoRA (mergeable on every family, no created biases) per task type and family."""
    folder = axis_folder(kind, model_type, tiny_model_dirs, causal_model_dirs)
    try:
        export_format = check_task_type_cell(kind, "lora", folder, tmp_path)
    except MicrotuneError as error:
        # Families whose causal LM changes the head's logits (Gemma 2's soft-capping).
        assert kind == "causal-lm" and "changes the LM head's logits" in str(error)
        assert getattr(TINY_CONFIGS[model_type](), "final_logit_softcapping", None)
        return
    assert export_format == expected_format(kind, model_type)


@pytest.mark.parametrize(
    ("kind", "model_type"),
    [(k, t) for k in KINDS for t in ("bert", "llama") if (k, t) != ("causal-lm", "bert")],
)
@EVERY_METHOD
def test_every_method_per_task_type(
    method_name, kind, model_type, tiny_model_dirs, causal_model_dirs, tmp_path
):
    folder = axis_folder(kind, model_type, tiny_model_dirs, causal_model_dirs)
    if kind == "causal-lm" and method_name == "linear":
        # The LM head stays frozen, so a linear probe trains nothing (`train` refuses it).
        model, _, _ = build_for_kind(kind, method_name, folder)
        assert model.count_trainable()["total"] == 0
        return
    export_format = check_task_type_cell(kind, method_name, folder, tmp_path)
    assert export_format in (None, expected_format(kind, model_type))
