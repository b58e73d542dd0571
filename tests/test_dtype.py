"""`--dtype`: the frozen base in bfloat16 or float16, everything that trains in float32.

For every method on a tiny BERT and a tiny Llama, on the CPU: two AdamW steps train float32
tensors (float32 optimizer state) and leave the low-precision base untouched, the artifact
records the base's dtype and reloads to bit-identical logits, merging keeps the base's dtype,
and the export folder holds weights in that dtype.

Merge tolerance. Methods that substitute tensors or train them as float32 copies (BitFit, full,
PaFi, HiWi) compute with exactly the rounded values a merge writes, so merged logits are
bit-identical. Methods added by a hook (SLaSh, LoRA) round at a different place once merged:
the hook sums the layer's rounded output and the float32 contribution and rounds the sum, the
merged layer rounds the folded weight or bias and then its output. Each changed activation can
thus move by about one unit in the last place (`torch.finfo(dtype).eps` relative: 2^-7 for
bfloat16, 2^-10 for float16); through two blocks and the float32 head the logits stay within
two such units of their own scale (measured: up to 0.75 unit in bfloat16, 1.2 in float16). The
trained change must be several times larger than that, or the check would pass for a method
that does nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from microtune.api import export_merged, load_exported, train
from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import DTYPES, fingerprint, load_backbone
from microtune.cli import main
from microtune.common.files import CONFIG_FILE
from microtune.errors import MicrotuneError
from microtune.methods import METHODS, build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.heads import default_readout
from microtune.tasks.spec import DataSource, get_task
from microtune.tasks.types import loss_fn
from microtune.training.config import TrainConfig

from .conftest import tiny_batch
from .test_method_matrix import ARCH_OPTIONS, TINY_OPTIONS

LOW_PRECISION = ("bfloat16", "float16")
# BitFit on Llama: create the biases it lacks, so the method really trains something.
OPTIONS = {**ARCH_OPTIONS, ("bitfit", "llama"): {"create_missing_biases": True}}
# (IA)³ on BERT: its default targets (key, value, FFN output) move bfloat16 logits by just under
# the five units asked below; query, key, value and the FFN's first linear move them clearly.
OPTIONS["peft-ia3", "bert"] = {"target_modules": "query,key,value,intermediate.dense"}
# Merged logits equal unmerged ones bit for bit: the forward pass already used the rounded
# values the merge writes (see the module docstring).
EXACT_MERGE = ("bitfit", "full", "hiwi", "linear", "pafi")
LABELS = torch.tensor([0, 1, 1, 0])


def build(method_name: str, folder, dtype: str, readout: str | None = None):
    backbone, tokenizer = load_backbone(str(folder), dtype)
    base_fingerprint = fingerprint(backbone)
    torch.manual_seed(0)
    options = {
        **TINY_OPTIONS.get(method_name, {}),
        **OPTIONS.get((method_name, backbone.config.model_type), {}),
    }
    causal = arch_for(backbone).causal
    # As `api.train` builds it: a decoder's sentence head has no bias (the stock export class).
    head = HeadConfig(num_labels=2, readout=readout or default_readout(causal), bias=not causal)
    method = build_method(method_name, options)
    model = TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
    return model.eval(), tokenizer, base_fingerprint


def frozen_dtypes(model: TaskModel) -> set[torch.dtype]:
    """Dtypes of the backbone's frozen parameters (the base; a peft peer's adapter tensors
    live in the backbone too, in float32)."""
    return {p.dtype for p in model.backbone.parameters() if not p.requires_grad}


def logits(model: TaskModel, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_batch(tokenizer, pair=True))


def merge_tolerance(dtype: str, reference: torch.Tensor) -> float:
    """Two units in the last place of `dtype` at the logits' scale (module docstring)."""
    return 2 * torch.finfo(DTYPES[dtype]).eps * max(1.0, reference.abs().max().item())


def two_steps(model: TaskModel, tokenizer) -> set[str]:
    """Two AdamW steps; returns the trainable tensors that received a nonzero gradient."""
    trainable = model.trainable_state()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    moved = set()
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS).backward()
        moved |= {n for n, p in trainable.items() if p.grad is not None and p.grad.any()}
        optimizer.step()
    model.eval()
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    return moved


def perturb(model: TaskModel) -> None:
    """Move the method's tensors well away from their start (two steps at 1e-2 move little)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.trainable_state().items():
            if not name.startswith("head."):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def exported_weights(folder) -> dict[str, torch.Tensor]:
    return {
        name: tensor
        for path in folder.rglob("*.safetensors")  # backbone + head: the backbone in backbone/
        if path.name != "head.safetensors"
        for name, tensor in load_file(path).items()
    }


@pytest.mark.filterwarnings("ignore:bitfit.*no biases:UserWarning")
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_trains_saves_merges_and_exports_on_a_low_precision_base(
    method_name, model_type, dtype, tiny_model_dirs, tmp_path
):
    folder = tiny_model_dirs[model_type]
    model, tokenizer, base_fingerprint = build(method_name, folder, dtype)
    assert frozen_dtypes(model) == {DTYPES[dtype]}
    trainable = model.trainable_state()
    assert {t.dtype for t in trainable.values()} == {torch.float32}
    # The base: the backbone's tensors that do not train (peft's peers keep theirs inside it,
    # some shared between layers, so named once per layer in the state dict).
    parameters = model.backbone.named_parameters(remove_duplicate=False)
    own = {name for name, parameter in parameters if parameter.requires_grad}
    base = {n: t.clone() for n, t in model.backbone.state_dict().items() if n not in own}
    start = {n: t.detach().clone() for n, t in trainable.items()}
    at_start = logits(model, tokenizer)

    moved = two_steps(model, tokenizer)
    assert "head.linear.weight" in moved
    if model.count_trainable()["method"]:
        assert any(not n.startswith("head.") for n in moved), "the method got no gradient"
    for name in moved:
        assert not torch.equal(trainable[name], start[name]), f"{name} did not train"
    # The base itself never changes while training (BitFit and full train float32 copies).
    after = {n: t for n, t in model.backbone.state_dict().items() if n not in own}
    assert after.keys() == base.keys() and all(torch.equal(t, base[n]) for n, t in after.items())

    perturb(model)
    unmerged = logits(model, tokenizer)
    save_artifact(
        tmp_path / "artifact",
        model,
        method_name=method_name,
        base_model=str(folder),
        base_fingerprint=base_fingerprint,
        task=task_record(get_task("sst2")),
        max_length=32,
    )
    record = json.loads((tmp_path / "artifact" / CONFIG_FILE).read_text())
    assert record["base_model"]["dtype"] == dtype
    reloaded, reloaded_tokenizer, config = load_artifact(tmp_path / "artifact")
    assert frozen_dtypes(reloaded) == {DTYPES[dtype]}
    assert torch.equal(logits(reloaded, reloaded_tokenizer), unmerged)
    if not METHODS[method_name].mergeable:
        return

    tolerance = merge_tolerance(dtype, unmerged)
    if model.count_trainable()["method"]:
        assert (unmerged - at_start).abs().max() > 5 * tolerance
    export_format = export_merged(reloaded, reloaded_tokenizer, config, tmp_path / "export")
    merged = logits(reloaded, reloaded_tokenizer)
    if method_name in EXACT_MERGE:
        assert torch.equal(merged, unmerged)
    else:
        assert (merged - unmerged).abs().max().item() <= tolerance

    weights = exported_weights(tmp_path / "export")
    assert weights and {t.dtype for t in weights.values()} == {DTYPES[dtype]}
    inner = {"backbone+head": "backbone", "sentence-transformers": "0_Transformer"}
    where = tmp_path / "export" / inner.get(export_format, "")
    saved = json.loads((where / "config.json").read_text())
    assert saved["dtype"] == dtype
    exported_logits, _ = load_exported(tmp_path / "export")
    batch = tiny_batch(reloaded_tokenizer, pair=True)
    if not arch_for(reloaded.backbone).token_type_ids:
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        exported = exported_logits(**batch)
    if export_format == "sequence-classification":
        # A stock class has one dtype: its classifier runs in the base's precision.
        assert (exported - merged).abs().max().item() <= merge_tolerance(dtype, merged)
    else:
        # The same low-precision weights; only the head's float32 matmul differs from nn.Linear's.
        assert (exported - merged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_a_sequence_classification_export_keeps_the_base_dtype(dtype, tiny_model_dirs, tmp_path):
    """BERT with the pooler read-out exports as `AutoModelForSequenceClassification`, whose
    classifier is in the base's dtype too (a stock model has one dtype)."""
    model, tokenizer, base_fingerprint = build("slash", tiny_model_dirs["bert"], dtype, "pooler")
    perturb(model)
    unmerged = logits(model, tokenizer)
    config = {"task": task_record(get_task("sst2")), "method": "slash", "base_model": {}}
    assert export_merged(model, tokenizer, config, tmp_path) == "sequence-classification"
    assert {t.dtype for t in exported_weights(tmp_path).values()} == {DTYPES[dtype]}
    exported_logits, exported = load_exported(tmp_path)
    assert exported.dtype == DTYPES[dtype]
    with torch.no_grad():
        out = exported_logits(**tiny_batch(tokenizer, pair=True))
    # The classifier now computes in the base's dtype: one more rounding of the logits.
    assert (out.float() - unmerged).abs().max().item() <= 2 * merge_tolerance(dtype, unmerged)


def test_train_dtype_from_the_command_line(tiny_model_dirs, toy_files, tmp_path, capsys):
    output = tmp_path / "run"
    argv = ["train", "--task", "sst2", "--method", "slash", "--d", "16", "--dtype", "bfloat16"]
    argv += ["--model", str(tiny_model_dirs["llama"]), "--output", str(output)]
    argv += ["--train-file", str(toy_files / "train.jsonl")]
    argv += ["--dev-file", str(toy_files / "dev.jsonl"), "--max-steps", "2", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    record = json.loads((output / CONFIG_FILE).read_text())
    assert record["base_model"]["dtype"] == "bfloat16"
    stored = load_file(output / "adapter.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float32}
    model, _, _ = load_artifact(output)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16


def test_an_artifact_without_a_dtype_is_float32_and_a_wrong_one_is_refused(
    tiny_model_dirs, toy_files, tmp_path
):
    folder = tiny_model_dirs["bert"]
    train(
        "sst2",
        "linear",
        tmp_path,
        model=str(folder),
        data=DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        train_config=TrainConfig(max_steps=1, progress=False, eval_every=0),
    )
    path = tmp_path / CONFIG_FILE
    record = json.loads(path.read_text())
    assert record["base_model"].pop("dtype") == "float32"
    record.pop("config_sha256")  # as an artifact from before --dtype (and the content hash)
    record["format_version"] = 1  # which format 1 is
    path.write_text(json.dumps(record))
    model, _, _ = load_artifact(tmp_path)
    assert next(model.backbone.parameters()).dtype == torch.float32
    with pytest.raises(MicrotuneError, match="--dtype float64 is not supported"):
        load_backbone(str(folder), "float64")
