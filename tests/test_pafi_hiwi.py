"""PaFi and HiWi (methods.md §4-5): masks, bit-identity, stored state, merging.

The method × architecture matrix (test_method_matrix.py) covers the default configs; this file
checks what is specific to each method, on the tiny models of every mapped architecture.
"""

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from microtune.api import artifact_summary
from microtune.artifacts.store import config_sha256, load_artifact, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint, load_backbone
from microtune.common.files import CONFIG_FILE, TENSORS_FILE
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.pafi import candidate_weights, mask_scores, select_lowest
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.heads import default_readout
from microtune.tasks.spec import get_task
from microtune.tasks.types import loss_fn

from .conftest import FAMILY_TYPES, make_tiny_model, tiny_batch

LABELS = torch.tensor([0, 1, 1, 0])
MATRIX = pytest.mark.parametrize("model_type", FAMILY_TYPES)


def build(folder, method_name, **options):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)
    head = HeadConfig(num_labels=2, readout=default_readout(arch_for(backbone).causal))
    method = build_method(method_name, options)
    model = TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
    return model.eval(), tokenizer


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tiny_batch(tokenizer, pair=True))


def train_steps(model, tokenizer, steps=3, weight_decay=0.1):
    optimizer = torch.optim.AdamW(
        model.trainable_state().values(), lr=1e-2, weight_decay=weight_decay
    )
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS).backward()
        optimizer.step()
    model.eval()
    return optimizer


def save(model, folder, directory, method_name):
    save_artifact(
        directory,
        model,
        method_name=method_name,
        base_model=str(folder),
        base_fingerprint=fingerprint(load_backbone(str(folder))[0]),
        task=task_record(get_task("sst2")),
        max_length=32,
    )


def flat_candidates(model):
    """Every candidate weight of the attached PaFi method, flattened in global position order."""
    return torch.cat([w.detach().reshape(-1) for _, w in model.method._candidates])


def selected(model) -> torch.Tensor:
    chosen = torch.zeros(model.method.total_candidates, dtype=torch.bool)
    chosen[model.method.positions] = True
    return chosen


# -- PaFi: the mask ------------------------------------------------------------------------


def brute_force_lowest(chunks, k):
    """Reference: a stable sort of all scores (ties keep position order), first k, ascending."""
    order = torch.sort(torch.cat(chunks), stable=True).indices[:k]
    return torch.sort(order).values


def test_streaming_selection_matches_a_stable_sort_with_ties():
    assert select_lowest([torch.tensor([1.0, 0, 1, 0]), torch.tensor([0.0, 1, 0])], 3).tolist() == [
        1,
        3,
        4,
    ]
    # A full pool: equal later scores never displace earlier ones.
    assert select_lowest([torch.zeros(2), torch.zeros(2)], 2).tolist() == [0, 1]
    generator = torch.Generator().manual_seed(0)
    for k in (1, 5, 17, 60):
        # Integer scores in a small range: many ties within and across chunks.
        chunks = [
            torch.randint(0, 6, (int(n),), generator=generator).float()
            for n in torch.randint(1, 30, (7,), generator=generator)
        ]
        if sum(c.numel() for c in chunks) >= k:
            assert torch.equal(select_lowest(chunks, k), brute_force_lowest(chunks, k))


def test_streaming_selection_releases_each_matrix_before_the_next():
    alive = []

    def matrix(seed):
        # Every earlier score matrix must be garbage by now: no second copy accumulates.
        assert all(ref() is None for ref in alive)
        tensor = torch.rand(10_000, generator=torch.Generator().manual_seed(seed))
        alive.append(weakref.ref(tensor))
        return tensor

    assert select_lowest((matrix(seed) for seed in range(6)), 50).numel() == 50
    assert len(alive) == 6


def test_mask_scores_hold_one_matrix_at_a_time(tiny_model_dirs):
    model, _ = build(tiny_model_dirs["bert"], "pafi")
    weights = [w for _, w in model.method._candidates]
    for mask in ("smallest", "random"):
        alive = []
        for score in mask_scores(weights, mask):
            assert all(ref() is None for ref in alive)
            alive.append(weakref.ref(score))
            del score


@MATRIX
def test_mask_is_one_global_threshold_with_exactly_k_entries(model_type, tiny_model_dirs):
    folder = tiny_model_dirs[model_type]
    for mask, k in (("smallest", 0.02), ("largest", 37)):
        model, _ = build(folder, "pafi", k=k, mask=mask)
        magnitudes = flat_candidates(model).abs()
        total = magnitudes.numel()
        expected_k = 37 if k == 37 else round(0.02 * total)
        chosen = selected(model)
        assert int(chosen.sum()) == model.method.values.numel() == expected_k
        inside, outside = magnitudes[chosen], magnitudes[~chosen]
        if mask == "smallest":
            assert inside.max() <= outside.min()
        else:
            assert inside.min() >= outside.max()
    # Candidates are the block weight matrices only: no embeddings, norms, biases.
    names = [name for name, _ in candidate_weights(model.backbone, model.arch)]
    assert names and all(name.endswith(".weight") for name in names)
    assert not any("emb" in name or "norm" in name.lower() or "wte" in name for name in names)


def test_default_candidates_are_the_attention_and_ffn_matrices(tiny_model_dirs):
    model, _ = build(tiny_model_dirs["llama"], "pafi")
    names = [name for name, _ in candidate_weights(model.backbone, model.arch)]
    per_block = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [name.split(".")[-2] for name in names] == per_block * 2


def test_random_mask_is_seeded(tiny_model_dirs):
    folder = tiny_model_dirs["bert"]
    first = build(folder, "pafi", mask="random", mask_seed=3)[0].method.positions
    again = build(folder, "pafi", mask="random", mask_seed=3)[0].method.positions
    other = build(folder, "pafi", mask="random", mask_seed=4)[0].method.positions
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.numel() == other.numel()


def test_k_must_be_a_count_or_a_fraction(tiny_model_dirs):
    for bad in (0, -1, 1.5):
        with pytest.raises(MicrotuneError, match="k must be"):
            build_method("pafi", {"k": bad})
    with pytest.raises(MicrotuneError, match="selects"):
        build(tiny_model_dirs["bert"], "pafi", k=10**9)
    with pytest.raises(MicrotuneError, match="matches no parameter"):
        build(tiny_model_dirs["bert"], "pafi", candidates="nothing_like_this")


def test_configured_candidates_may_include_embeddings(tiny_model_dirs):
    # k > 32: the 32 smallest are the all-zero [PAD] row, which no output depends on.
    model, tokenizer = build(tiny_model_dirs["bert"], "pafi", k=100, candidates="word_embeddings")
    assert [name for name, _ in model.method._candidates] == ["embeddings.word_embeddings.weight"]
    before = logits(model, tokenizer)
    with torch.no_grad():
        model.method.values.add_(0.5)
    unmerged = logits(model, tokenizer)
    model.merge()
    assert (unmerged - before).abs().max() > 1e-4
    assert torch.equal(logits(model, tokenizer), unmerged)


# -- PaFi: training ----------------------------------------------------------------------------


@MATRIX
def test_training_moves_only_masked_entries(model_type, tiny_model_dirs):
    model, tokenizer = build(tiny_model_dirs[model_type], "pafi", k=0.05)
    backbone_before = {n: t.detach().clone() for n, t in model.backbone.state_dict().items()}
    original = model.method.values.detach().clone()
    optimizer = train_steps(model, tokenizer)

    # The optimizer holds state for k values (and the head), never for a weight matrix.
    k = model.method.values.numel()
    assert optimizer.state[model.method.values]["exp_avg"].shape == (k,)
    assert not torch.equal(model.method.values, original)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), f"{name} changed while training"

    # Merging writes the trained values and nothing else: every unmasked entry keeps its bits.
    chosen, values = selected(model), model.method.values.detach().clone()
    candidates = dict(model.method._candidates)
    model.merge()
    merged = torch.cat([w.detach().reshape(-1) for w in candidates.values()])
    assert torch.equal(merged[~chosen], flat_before_training(backbone_before, candidates)[~chosen])
    assert torch.equal(merged[chosen], values)
    for name, tensor in model.backbone.state_dict().items():
        if name not in candidates:
            assert torch.equal(tensor, backbone_before[name]), f"{name} changed by the merge"


def flat_before_training(state, candidates):
    return torch.cat([state[name].reshape(-1) for name in candidates])


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_value_gradients_equal_full_fine_tuning_gradients_at_the_mask(model_type, tiny_model_dirs):
    folder = tiny_model_dirs[model_type]
    model, tokenizer = build(folder, "pafi", k=0.05)
    loss_fn(model(**tiny_batch(tokenizer, pair=True)), LABELS).backward()

    full, _ = build(folder, "full")
    full.head.load_state_dict(model.head.state_dict())
    loss_fn(full(**tiny_batch(tokenizer, pair=True)), LABELS).backward()
    weights = dict(full.backbone.named_parameters())
    expected = torch.cat([weights[name].grad.reshape(-1) for name, _ in model.method._candidates])
    torch.testing.assert_close(
        model.method.values.grad, expected[model.method.positions], rtol=1e-5, atol=1e-7
    )


def test_unmerge_restores_the_pretrained_bits(tiny_model_dirs):
    model, tokenizer = build(tiny_model_dirs["gpt2"], "pafi", k=0.05)
    before = {n: t.clone() for n, t in model.backbone.state_dict().items()}
    with torch.no_grad():
        model.method.values.mul_(3.0).add_(0.1)
    unmerged = logits(model, tokenizer)
    model.method.merge(model.backbone, model.arch)
    assert torch.equal(logits(model, tokenizer), unmerged)
    model.method.unmerge()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert torch.equal(logits(model, tokenizer), unmerged)  # the values apply again


# -- PaFi: the artifact -----------------------------------------------------------------------


def test_artifact_stores_values_and_refuses_a_changed_mask(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["bert"]
    model, tokenizer = build(folder, "pafi", k=0.05)
    train_steps(model, tokenizer, steps=1)
    save(model, folder, tmp_path / "a", "pafi")
    with safe_open(str(tmp_path / "a" / TENSORS_FILE), framework="pt") as tensors:
        assert sorted(tensors.keys()) == ["head.linear.bias", "head.linear.weight", "method.values"]
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["method_state"]["mask_fingerprint"] == model.method.mask_fingerprint
    assert config["method_state"]["k"] == model.method.values.numel()

    reloaded, _, _ = load_artifact(tmp_path / "a")
    assert torch.equal(reloaded.method.positions, model.method.positions)  # recomputed, equal
    assert torch.equal(logits(reloaded, tokenizer), logits(model, tokenizer))

    # A tampered mask fingerprint is refused with one line (its content hash forged too, so
    # that the mask check is what refuses it).
    config["method_state"]["mask_fingerprint"] = "sha256:" + "0" * 64
    config["config_sha256"] = config_sha256(config)
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MicrotuneError, match="mask recomputed from this base model") as error:
        load_artifact(tmp_path / "a")
    assert "\n" not in str(error.value)


def nudged_base(folder, tmp_path, model):
    """A copy of the base model with one unselected candidate weight set to zero: a different
    base fingerprint and a different smallest-magnitude mask."""
    nudged = make_tiny_model("bert", tmp_path / "nudged")
    backbone, _ = load_backbone(str(nudged))
    chosen = selected(model)
    position = int((~chosen).nonzero()[0])
    offset = 0
    for name, weight in model.method._candidates:
        if position < offset + weight.numel():
            with torch.no_grad():
                backbone.get_parameter(name).view(-1)[position - offset] = 0.0
            break
        offset += weight.numel()
    backbone.save_pretrained(nudged)
    return nudged


def test_a_changed_base_weight_is_refused(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["bert"]
    model, _ = build(folder, "pafi", k=0.05)
    save(model, folder, tmp_path / "a", "pafi")
    nudged = nudged_base(folder, tmp_path, model)
    with pytest.raises(MicrotuneError, match="base model mismatch") as error:
        load_artifact(tmp_path / "a", model_name=str(nudged))
    assert "\n" not in str(error.value)

    # Past the base fingerprint, the recomputed mask itself no longer matches.
    on_nudged, _ = build(nudged, "pafi", k=0.05)
    assert not torch.equal(on_nudged.method.positions, model.method.positions)
    stored = {"method.values": model.method.values.detach()}
    trainable = {"method.values": on_nudged.method.values}
    with pytest.raises(MicrotuneError, match="differs from the artifact") as error:
        on_nudged.method.load_stored_state(stored, trainable, model.method.stored_metadata())
    assert "\n" not in str(error.value)


def test_stored_indices_are_used_instead_of_recomputing(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["bert"]
    model, _ = build(folder, "pafi", k=0.05, store_indices=True)
    save(model, folder, tmp_path / "a", "pafi")
    with safe_open(str(tmp_path / "a" / TENSORS_FILE), framework="pt") as tensors:
        assert tensors.get_tensor("method.positions").dtype == torch.int64
    summary = artifact_summary(tmp_path / "a")
    k = model.method.values.numel()
    assert summary["stored_parameters"]["method"] == 2 * k  # values and positions
    assert summary["trainable_parameters"]["method"] == k

    nudged = nudged_base(folder, tmp_path, model)
    on_nudged, _ = build(nudged, "pafi", k=0.05, store_indices=True)
    with safe_open(str(tmp_path / "a" / TENSORS_FILE), framework="pt") as tensors:
        stored = {"method.values": tensors.get_tensor("method.values")}
        stored["method.positions"] = tensors.get_tensor("method.positions")
    trainable = {"method.values": on_nudged.method.values}
    on_nudged.method.load_stored_state(stored, trainable, model.method.stored_metadata())
    assert torch.equal(on_nudged.method.positions, model.method.positions)

    # Stored positions that do not hash to the recorded fingerprint are refused.
    other_mask = build(folder, "pafi", k=0.05, mask="random")[0].method.positions
    stored["method.positions"] = other_mask
    with pytest.raises(MicrotuneError, match="mask stored"):
        on_nudged.method.load_stored_state(stored, trainable, model.method.stored_metadata())


# -- HiWi --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "gpt2"])
def test_hiwi_bias_artifact_holds_only_the_new_biases(model_type, tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs[model_type]
    for r in (2, 16):
        model, tokenizer = build(folder, "hiwi", r=r)
        train_steps(model, tokenizer, steps=2)
        save(model, folder, tmp_path / str(r), "hiwi")
        layers = model.arch.num_layers(model.backbone)
        ffn_in = model.arch.block_part(model.backbone, 0, "ffn_in").bias.numel()  # F
        ffn_out = model.arch.block_part(model.backbone, 0, "ffn_out").bias.numel()  # D
        numbers = {"head": 0, "method": 0}
        with safe_open(str(tmp_path / str(r) / TENSORS_FILE), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                part = "head" if name.startswith("head.") else "method"
                numbers[part] += tensors.get_tensor(name).numel()
                assert part == "head" or name.endswith(".bias")
        assert numbers["method"] == layers * (ffn_in + ffn_out)
        assert numbers["head"] == model.head.linear.weight.numel() + 2
        summary = artifact_summary(tmp_path / str(r))
        assert summary["stored_parameters"]["method"] == layers * (ffn_in + ffn_out)
        assert summary["trainable_parameters"] == model.count_trainable()

        # Loading writes the biases and serves without an adapter, bit for bit.
        reloaded, _, _ = load_artifact(tmp_path / str(r))
        assert reloaded.count_trainable()["method"] == 0
        assert torch.equal(logits(reloaded, tokenizer), logits(model, tokenizer))


@MATRIX
@pytest.mark.parametrize("variant", ["bias", "weight"])
def test_hiwi_merges_exactly(model_type, variant, tiny_model_dirs):
    folder = tiny_model_dirs[model_type]
    if variant == "bias" and not has_ffn_biases(folder):
        with pytest.raises(MicrotuneError, match="--variant weight") as error:
            build(folder, "hiwi", variant=variant)
        assert "\n" not in str(error.value)
        return
    model, tokenizer = build(folder, "hiwi", variant=variant, r=4)
    base = logits(model, tokenizer)
    plain, _ = build(tiny_model_dirs[model_type], "linear")
    plain.head.load_state_dict(model.head.state_dict())
    assert torch.equal(logits(plain, tokenizer), base)  # B = 0: P' = P exactly at the start
    train_steps(model, tokenizer, steps=3, weight_decay=0.0)
    unmerged = logits(model, tokenizer)
    assert (unmerged - base).abs().max() > 1e-4
    assert model.merge().method is None
    assert (logits(model, tokenizer) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_hiwi_weight_variant_adapts_rows_along_the_input_dimension(model_type, tiny_model_dirs):
    model, _ = build(tiny_model_dirs[model_type], "hiwi", variant="weight", r=3, activation="tanh")
    module = model.arch.block_part(model.backbone, 0, "ffn_in")
    adapter = model.method.adapters["0-ffn_in"]
    with torch.no_grad():
        adapter.B.normal_()
    rows = module.weight if model_type == "gpt2" else module.weight.T  # (in, out)
    assert adapter.A.shape == (rows.shape[1], 3)
    expected = rows + torch.tanh(rows @ adapter.A) @ adapter.B
    updated = model.method.updated("0-ffn_in")
    torch.testing.assert_close(updated if model_type == "gpt2" else updated.T, expected)


def has_ffn_biases(folder) -> bool:
    backbone, _ = load_backbone(str(folder))
    arch = arch_for(backbone)
    return all(
        arch.block_part(backbone, 0, part).bias is not None for part in ("ffn_in", "ffn_out")
    )


def test_hiwi_bias_variant_needs_ffn_biases(tiny_model_dirs):
    assert not has_ffn_biases(tiny_model_dirs["llama"])
    with pytest.raises(MicrotuneError, match="--variant weight") as error:
        build(tiny_model_dirs["llama"], "hiwi")
    assert "\n" not in str(error.value)


def test_hiwi_options_are_checked():
    with pytest.raises(MicrotuneError, match="variant"):
        build_method("hiwi", {"variant": "both"})
    with pytest.raises(MicrotuneError, match="r must"):
        build_method("hiwi", {"r": 0})
    with pytest.raises(MicrotuneError, match="activation"):
        build_method("hiwi", {"activation": "sigmoid"})
