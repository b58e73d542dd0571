"""Memory-lean projections: no matrix kept; same outputs, gradients and artifacts."""

import pytest
import torch

from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.methods import build_method
from microtune.methods.projections import ProjectionBank, project_from_seed
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.inference import predict
from microtune.tasks.types import loss_fn

from .conftest import ARCH_TYPES, tiny_batch

D = 16
LEAN_METHODS = ("slash", "jrwarp")
TASK = {
    "name": "sst2",
    "num_labels": 3,
    "metrics": ["accuracy"],
    "text_columns": ["sentence"],
    "label_names": [],
    "dev_split": "validation",
}


def lean_model(folder, method, memory_lean, readout="mean"):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)  # same z and head whatever memory_lean is
    model = TaskModel(
        backbone,
        HeadConfig(num_labels=3, readout=readout),
        build_method(method, {"d": D, "memory_lean": memory_lean, "projection_seed": 3}),
        mask_token_id=tokenizer.mask_token_id,
    )
    with torch.no_grad():
        model.method.z.mul_(5.0)
    return model.eval(), tokenizer


def test_seeded_projection_forward_and_gradcheck():
    bank = ProjectionBank(seed=4, d=12, widths=(7, 9))
    z = torch.randn(12, dtype=torch.float64, requires_grad=True)
    for layer in (0, 1):
        expected = z.detach() @ bank.matrix(layer).double()
        assert torch.equal(project_from_seed(z.detach(), bank, layer), expected)
        assert torch.autograd.gradcheck(lambda v, layer=layer: project_from_seed(v, bank, layer), z)


def saved_shapes(run) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while `run()` builds its graph."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return shapes


@pytest.mark.parametrize("method", LEAN_METHODS)
def test_lean_keeps_no_projection_in_memory(method, tiny_model_dirs):
    stored, tokenizer = lean_model(tiny_model_dirs["bert"], method, memory_lean=False)
    lean, _ = lean_model(tiny_model_dirs["bert"], method, memory_lean=True)
    batch = tiny_batch(tokenizer)
    widths = set(stored.method.bank.widths)
    assert any(name.startswith("projection_") for name, _ in stored.method.named_buffers())
    assert list(lean.method.named_buffers()) == []
    # Neither kept as a buffer nor saved by autograd for the backward pass.
    projection_shapes = {(D, w) for w in widths}
    assert projection_shapes & set(saved_shapes(lambda: stored(**batch).sum()))
    assert not projection_shapes & set(saved_shapes(lambda: lean(**batch).sum()))


@pytest.mark.parametrize("method", LEAN_METHODS)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_lean_gradients_match_the_stored_path(model_type, method, tiny_model_dirs):
    labels = torch.tensor([0, 1, 2, 0])
    grads, logits = {}, {}
    for memory_lean in (False, True):
        model, tokenizer = lean_model(tiny_model_dirs[model_type], method, memory_lean)
        model.train()
        logits[memory_lean] = model(**tiny_batch(tokenizer, pair=True))
        loss_fn(logits[memory_lean], labels).backward()
        grads[memory_lean] = model.method.z.grad.clone()
    assert torch.allclose(logits[True], logits[False], atol=1e-6, rtol=0)
    stored, lean = grads[False], grads[True]
    assert stored.norm() > 0
    relative_error = ((lean - stored).norm() / stored.norm()).item()
    assert relative_error <= 1e-6, relative_error


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_lean_slash_merges_like_the_stored_path(model_type, tiny_model_dirs):
    merged = {}
    for memory_lean in (False, True):
        model, tokenizer = lean_model(tiny_model_dirs[model_type], "slash", memory_lean)
        with torch.no_grad():
            unmerged = model(**tiny_batch(tokenizer))
            model.merge()
            merged[memory_lean] = model(**tiny_batch(tokenizer))
        assert (merged[memory_lean] - unmerged).abs().max() <= 1e-5
    assert torch.equal(merged[True], merged[False])


@pytest.mark.parametrize("trained_lean", [False, True])
@pytest.mark.parametrize("method", LEAN_METHODS)
@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama"])
def test_artifacts_load_with_either_path(
    model_type, method, trained_lean, tiny_model_dirs, tmp_path
):
    folder = tiny_model_dirs[model_type]
    model, tokenizer = lean_model(folder, method, trained_lean)
    optimizer = torch.optim.AdamW(model.trainable_state().values(), lr=0.1)
    model.train()
    loss_fn(model(**tiny_batch(tokenizer)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()  # a trained z, not the initial one
    save_artifact(
        tmp_path,
        model,
        method_name=method,
        base_model=str(folder),
        base_fingerprint=fingerprint(model.backbone),
        task=TASK,
        max_length=32,
    )
    batch = tiny_batch(tokenizer, pair=True)
    rows = [
        {k: v[i][batch["attention_mask"][i].bool()].tolist() for k, v in batch.items()}
        for i in range(4)
    ]
    expected = predict(model, rows, tokenizer.pad_token_id)

    same, _, config = load_artifact(tmp_path)
    other, _, _ = load_artifact(tmp_path, method_options={"memory_lean": not trained_lean})
    assert config["method_config"]["memory_lean"] is trained_lean
    assert same.method.config.memory_lean is trained_lean
    assert other.method.config.memory_lean is (not trained_lean)
    assert (predict(same, rows, tokenizer.pad_token_id) == expected).all()
    assert abs(predict(other, rows, tokenizer.pad_token_id) - expected).max() <= 1e-6
    # The artifact holds only z and the head: the projections come from the seed.
    assert sorted(model.trainable_state()) == ["head.linear.bias", "head.linear.weight", "method.z"]
