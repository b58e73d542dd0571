"""SLaSh on every architecture: what trains, what it computes, and that merging is exact."""

import copy

import pytest
import torch

from microtune.backbone.load import load_backbone
from microtune.methods import build_method
from microtune.methods.slash import POSITIONS, site_part
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.types import loss_fn

from .conftest import ARCH_TYPES, tiny_batch

D = 16


def slash_model(folder, position="output", z_scale=1.0, readout="first", **options):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)
    method = build_method("slash", {"d": D, "position": position, **options})
    model = TaskModel(
        backbone,
        HeadConfig(num_labels=3, readout=readout),
        method,
        mask_token_id=tokenizer.mask_token_id,
    )
    with torch.no_grad():
        method.z.mul_(z_scale)
    return model.eval(), tokenizer


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_only_z_and_head_train(model_type, tiny_model_dirs):
    model, tokenizer = slash_model(tiny_model_dirs[model_type])
    trainable = model.trainable_state()
    assert sorted(trainable) == ["head.linear.bias", "head.linear.weight", "method.z"]
    assert model.count_trainable() == {"head": 32 * 3 + 3, "method": D, "total": D + 99}

    before = copy.deepcopy(model.backbone.state_dict())
    z_before = model.method.z.detach().clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
    model.train()
    loss_fn(model(**tiny_batch(tokenizer)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert not torch.equal(model.method.z, z_before)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_zero_z_is_the_pretrained_function(model_type, tiny_model_dirs):
    model, tokenizer = slash_model(tiny_model_dirs[model_type], z_init="zeros")
    batch = tiny_batch(tokenizer)
    keep = {"input_ids", "attention_mask"} | (
        {"token_type_ids"} if model.arch.token_type_ids else set()
    )
    inputs = {k: v for k, v in batch.items() if k in keep}
    with torch.no_grad():
        shifted = model.backbone(**inputs).last_hidden_state
        model.method.detach()
        plain = model.backbone(**inputs).last_hidden_state
    assert torch.equal(shifted, plain)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_shift_is_z_times_projection_at_the_site(model_type, position, tiny_model_dirs):
    model, tokenizer = slash_model(tiny_model_dirs[model_type], position=position, z_scale=5.0)
    site = model.arch.block_part(model.backbone, 1, site_part(model.arch, position))
    seen = {}
    site.register_forward_hook(lambda m, i, o: seen.update(inputs=i, output=o))
    with torch.no_grad():
        model(**tiny_batch(tokenizer))
        plain = site.forward(*seen["inputs"])  # the layer itself, without any hook
        expected = model.method.z @ model.method.bank.matrix(1)
    assert torch.allclose(seen["output"] - plain, expected.expand_as(plain), atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_several_positions_shift_each_site_through_a_projection_of_its_own(
    model_type, tiny_model_dirs
):
    folder = tiny_model_dirs[model_type]
    model, tokenizer = slash_model(folder, position="output+attention", z_scale=5.0)
    alone, _ = slash_model(folder, position="output")
    layers = model.arch.num_layers(model.backbone)
    bank = model.method.bank
    assert len(bank.widths) == 2 * layers
    # The first position keeps the projections it has alone; the second draws new ones.
    assert torch.equal(bank.matrix(1), alone.method.bank.matrix(1))
    assert not torch.equal(bank.matrix(layers + 1)[:, :4], bank.matrix(1)[:, :4])
    seen = {}
    for position in ("output", "attention"):
        site = model.arch.block_part(model.backbone, 1, site_part(model.arch, position))
        site.register_forward_hook(lambda m, i, o, p=position: seen.update({p: (i, o, m)}))
    with torch.no_grad():
        model(**tiny_batch(tokenizer))
        for position, index in (("output", 1), ("attention", layers + 1)):
            inputs, output, site = seen[position]
            expected = model.method.z @ bank.matrix(index)
            assert torch.allclose(output - site.forward(*inputs), expected, atol=1e-5)


@pytest.mark.parametrize("position", [*POSITIONS, "output+attention"])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_merge_is_exact_and_leaves_the_base_architecture(model_type, position, tiny_model_dirs):
    folder = tiny_model_dirs[model_type]
    model, tokenizer = slash_model(folder, position=position, z_scale=20.0)
    base, _ = load_backbone(str(folder))
    batch = tiny_batch(tokenizer, pair=True)
    with torch.no_grad():
        unmerged = model(**batch)
        model.merge()
        merged = model(**batch)
    assert model.method is None
    assert (unmerged - merged).abs().max().item() <= 1e-5
    merged_backbone = model.backbone
    assert [type(m) for m in merged_backbone.modules()] == [type(m) for m in base.modules()]
    if model_type == "llama":
        # Llama has no biases to fold into; the merge switches on the config's bias flags.
        flags = {"attention": "attention_bias"}
        for part in position.split("+"):
            assert getattr(merged_backbone.config, flags.get(part, "mlp_bias")) is True
    else:
        assert sum(p.numel() for p in merged_backbone.parameters()) == sum(
            p.numel() for p in base.parameters()
        )
        assert set(merged_backbone.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merged_model_reloads_as_a_stock_model(model_type, tiny_model_dirs, tmp_path):
    from transformers import AutoModel

    model, tokenizer = slash_model(tiny_model_dirs[model_type], z_scale=20.0)
    batch = tiny_batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        model.merge()
        expected = model.backbone(**inputs).last_hidden_state
    model.backbone.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = reloaded(**inputs).last_hidden_state
    assert torch.equal(got, expected)


def test_bad_options_are_one_line_errors():
    from microtune.errors import MicrotuneError

    for options, fragment in (
        ({"position": "ffn"}, "position 'ffn' unknown"),
        ({"position": "output+output"}, "position 'output\\+output' unknown"),
        ({"position": "output+"}, 'several joined by "\\+" without repeats'),
        ({"d": 0}, "d must be an integer in 1..1048576"),
        ({"d": 2**20 + 1}, "d must be an integer in 1..1048576"),
        ({"z_init": "ones"}, "z_init 'ones' unknown"),
        ({"rank": 4}, "unknown option(s) ['rank']"),
    ):
        with pytest.raises(
            MicrotuneError,
            match=fragment.replace("(", r"\(")
            .replace(")", r"\)")
            .replace("[", r"\[")
            .replace("]", r"\]"),
        ):
            build_method("slash", options)
