"""The baselines' own behaviour: what each one trains, LoRA's arithmetic, adapters' placement."""

import pytest
import torch
from torch import nn

from microtune.api import merge_artifact
from microtune.artifacts.store import save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.lora import LoRA
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.spec import get_task

from .conftest import ARCH_TYPES, tiny_batch

HIDDEN = 32  # hidden size of every tiny model in conftest
LAYERS = 2


def task_model(folder, method_name, readout="first", **options):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)
    method = build_method(method_name, options)
    model = TaskModel(backbone, HeadConfig(num_labels=2, readout=readout), method)
    return model.eval(), tokenizer


def inputs_of(model, tokenizer, pair=False):
    batch = tiny_batch(tokenizer, pair=pair)
    keep = {"input_ids", "attention_mask"} | (
        {"token_type_ids"} if model.arch.token_type_ids else set()
    )
    return {k: v for k, v in batch.items() if k in keep}


def randomize_lora_b(method: LoRA, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for factors in method.factors.values():
            factors.B.copy_(torch.randn(factors.B.shape, generator=generator) * scale)


# --- full fine-tuning, linear probe, BitFit -------------------------------------------------


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_full_trains_every_backbone_parameter(model_type, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "full")
    backbone_names = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    head_names = {"head.linear.weight", "head.linear.bias"}
    assert set(model.trainable_state()) == backbone_names | head_names
    model.merge()
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_linear_probe_trains_only_the_head(model_type, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "linear")
    assert sorted(model.trainable_state()) == ["head.linear.bias", "head.linear.weight"]
    assert model.count_trainable() == {"head": HIDDEN * 2 + 2, "method": 0, "total": 66}
    assert model.backbone_dropout is False  # frozen features: dropout off by default


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "gpt2"])
def test_bitfit_trains_exactly_the_biases(model_type, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "bitfit")
    biases = {
        f"backbone.{name}": p
        for name, p in model.backbone.named_parameters()
        if name.endswith(".bias")
    }
    assert any("LayerNorm" in n or "layer_norm" in n or "ln_" in n for n in biases)
    trainable = model.trainable_state()
    assert set(trainable) == set(biases) | {"head.linear.weight", "head.linear.bias"}
    assert model.count_trainable()["method"] == sum(p.numel() for p in biases.values())


def test_bitfit_on_llama_warns_that_only_the_head_trains(tiny_model_dirs):
    with pytest.warns(UserWarning, match="no biases"):
        model, _ = task_model(tiny_model_dirs["llama"], "bitfit")
    assert model.count_trainable()["method"] == 0


def test_bitfit_creates_llama_biases_and_merges_into_a_stock_model(tiny_model_dirs, tmp_path):
    from transformers import AutoModel

    model, tokenizer = task_model(tiny_model_dirs["llama"], "bitfit", create_missing_biases=True)
    created = [n for n in model.trainable_state() if n.startswith("backbone.")]
    # q, k, v, o, gate, up and down projections of each block.
    assert len(created) == 7 * LAYERS
    with torch.no_grad():
        for parameter in model.trainable_state().values():
            parameter.add_(torch.randn_like(parameter))
    inputs = inputs_of(model, tokenizer)
    with torch.no_grad():
        expected = model.backbone(**inputs).last_hidden_state
        model.merge()
    assert model.backbone.config.attention_bias is True
    assert model.backbone.config.mlp_bias is True
    model.backbone.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).last_hidden_state, expected)


# --- LoRA -----------------------------------------------------------------------------------

DEFAULT_LORA_TARGETS = {
    "bert": ("attention.self.query", "attention.self.value"),
    "roberta": ("attention.self.query", "attention.self.value"),
    "distilbert": ("attention.q_lin", "attention.v_lin"),
    "gpt2": ("attn.c_attn",),
    "llama": ("self_attn.q_proj", "self_attn.v_proj"),
}
# rank · (in + out) per target, summed over a block's targets (rank 4, hidden 32): GPT-2's fused
# c_attn outputs 3 · 32; the tiny Llama has one key/value head, so v_proj outputs 16.
LORA_PER_LAYER = {"bert": 512, "roberta": 512, "distilbert": 512, "gpt2": 512, "llama": 448}
BLOCKS = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "distilbert": "transformer.layer",
    "gpt2": "h",
    "llama": "layers",
}


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_lora_default_targets_are_query_and_value(model_type, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "lora", rank=4)
    expected = [
        f"{BLOCKS[model_type]}.{layer}.{part}"
        for layer in range(LAYERS)
        for part in DEFAULT_LORA_TARGETS[model_type]
    ]
    assert model.method.target_paths() == expected
    assert model.count_trainable()["method"] == LAYERS * LORA_PER_LAYER[model_type]


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_lora_starts_at_the_pretrained_function(model_type, tiny_model_dirs):
    model, tokenizer = task_model(tiny_model_dirs[model_type], "lora", rank=4)
    inputs = inputs_of(model, tokenizer)
    with torch.no_grad():
        with_lora = model.backbone(**inputs).last_hidden_state
        model.method.detach()
        plain = model.backbone(**inputs).last_hidden_state
    assert torch.equal(with_lora, plain)
    assert all(f.A.abs().sum() > 0 and f.B.abs().sum() == 0 for f in model.method.factors.values())


def test_lora_on_gpt2_conv1d_is_x_w_plus_scaled_x_a_b(tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs["gpt2"], "lora", rank=4, alpha=12.0)
    method = model.method
    randomize_lora_b(method)
    layer = model.backbone.h[1].attn.c_attn
    factors = method.factors["h-1-attn-c_attn"]
    assert layer.weight.shape == (HIDDEN, 3 * HIDDEN)  # Conv1D: (in, out)
    x = torch.randn(3, 5, HIDDEN)
    scale = 12.0 / 4
    with torch.no_grad():
        explicit = x @ layer.weight + layer.bias + scale * (x @ factors.A.T) @ factors.B.T
        hooked = layer(x)
        # float32 sums of ~7 in magnitude round at ~1e-6: the kernels' order of additions
        # differs between CPUs (1.4e-6 seen on an AMD EPYC), hence the relative term.
        torch.testing.assert_close(hooked, explicit, atol=1e-6, rtol=1e-6)
        weight_before = layer.weight.clone()
        model.merge()
        torch.testing.assert_close(
            layer.weight, weight_before + scale * (factors.B @ factors.A).T, atol=1e-7, rtol=0
        )
        torch.testing.assert_close(layer(x), explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_lora_merge_then_unmerge_round_trips(model_type, tiny_model_dirs):
    model, tokenizer = task_model(tiny_model_dirs[model_type], "lora", rank=4)
    method = model.method
    randomize_lora_b(method)
    targets = [model.backbone.get_submodule(path) for path in method.target_paths()]
    original = [t.weight.detach().clone() for t in targets]
    batch = tiny_batch(tokenizer)
    with torch.no_grad():
        before = model(**batch)
        method.merge(model.backbone, model.arch)
        assert all(not torch.equal(t.weight, w) for t, w in zip(targets, original, strict=True))
        merged = model(**batch)  # hooks gone: the folded weights alone
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
        with pytest.raises(MicrotuneError, match="already merged"):
            method.merge(model.backbone, model.arch)

        method.unmerge()
        for target, weight in zip(targets, original, strict=True):
            torch.testing.assert_close(target.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(**batch), before, atol=1e-5, rtol=0)
        with pytest.raises(MicrotuneError, match="not merged"):
            method.unmerge()


@pytest.mark.parametrize(
    ("model_type", "pattern", "expected"),
    [
        (
            "bert",
            "query",
            ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"],
        ),
        (
            "distilbert",
            "ffn.lin1, q_lin",
            [
                "transformer.layer.0.attention.q_lin",
                "transformer.layer.0.ffn.lin1",
                "transformer.layer.1.attention.q_lin",
                "transformer.layer.1.ffn.lin1",
            ],
        ),
        ("gpt2", "h.1.mlp.c_fc", ["h.1.mlp.c_fc"]),
    ],
)
def test_lora_target_patterns(model_type, pattern, expected, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "lora", rank=2, target_modules=pattern)
    assert model.method.target_paths() == expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("nope", "matches no layer"), ("attention", "not a Linear or Conv1D layer")],
)
def test_lora_bad_target_patterns_are_one_line_errors(pattern, message, tiny_model_dirs):
    with pytest.raises(MicrotuneError, match=message):
        task_model(tiny_model_dirs["bert"], "lora", target_modules=pattern)


def test_lora_dropout_only_in_training(tiny_model_dirs):
    model, tokenizer = task_model(
        tiny_model_dirs["bert"], "lora", rank=4, lora_dropout=0.5, dropout=False
    )
    randomize_lora_b(model.method)
    batch = tiny_batch(tokenizer)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(**batch), model(**batch))
        model.eval()
        assert torch.equal(model(**batch), model(**batch))


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_lora_matches_peft_with_the_same_factors(model_type, tiny_model_dirs):
    """Same A, B, rank and alpha in `peft` give the same function (a reference for the math)."""
    peft = pytest.importorskip("peft")
    folder = tiny_model_dirs[model_type]
    model, tokenizer = task_model(folder, "lora", rank=4, alpha=8.0)
    method = model.method
    randomize_lora_b(method)
    targets = {t.rsplit(".", 1)[-1] for t in method.target_paths()}
    reference, _ = load_backbone(str(folder))
    config = peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=sorted(targets), fan_in_fan_out=model_type == "gpt2"
    )
    reference = peft.get_peft_model(reference, config).eval()
    with torch.no_grad():
        for path, key in zip(method.target_paths(), method.factors, strict=True):
            layer = reference.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(method.factors[key].A)
            layer.lora_B["default"].weight.copy_(method.factors[key].B)
        inputs = inputs_of(model, tokenizer)
        ours = model.backbone(**inputs).last_hidden_state
        theirs = reference(**inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_lora_config_errors_are_one_line():
    for options, fragment in (
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": 0.0}, "alpha must be positive"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"r": 4}, "unknown option"),
    ):
        with pytest.raises(MicrotuneError, match=fragment):
            build_method("lora", options)


# --- bottleneck adapters --------------------------------------------------------------------


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_adapter_sites_and_size(model_type, adapter_type, tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs[model_type], "adapter", adapter_type=adapter_type)
    sites = {"houlsby": ["attn_out", "ffn_out"], "pfeiffer": ["ffn_out"]}[adapter_type]
    assert sorted(model.method.adapters) == sorted(sites)
    width = HIDDEN // 16  # default reduction factor
    per_adapter = 2 * HIDDEN * width + width + HIDDEN
    assert model.count_trainable()["method"] == len(sites) * LAYERS * per_adapter


def test_adapter_bottleneck_and_activation_options(tiny_model_dirs):
    model, _ = task_model(tiny_model_dirs["bert"], "adapter", bottleneck=5, activation="gelu")
    adapter = model.method.adapters["ffn_out"][0]
    assert adapter.down.weight.shape == (5, HIDDEN)
    assert isinstance(adapter.activation, nn.GELU)
    model, _ = task_model(tiny_model_dirs["bert"], "adapter", reduction_factor=4)
    assert model.method.adapters["attn_out"][1].up.weight.shape == (HIDDEN, 8)


@pytest.mark.parametrize("part", ["attn_out", "ffn_out"])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_adapter_adds_its_bottleneck_to_the_sublayer_output(part, model_type, tiny_model_dirs):
    model, tokenizer = task_model(tiny_model_dirs[model_type], "adapter")
    site = model.arch.block_part(model.backbone, 1, part)
    adapter = model.method.adapters[part][1]
    seen = {}
    site.register_forward_hook(lambda m, i, o: seen.update(inputs=i, output=o))
    with torch.no_grad():
        model(**tiny_batch(tokenizer))
        plain = site.forward(*seen["inputs"])
        expected = plain + adapter.up(torch.relu(adapter.down(plain)))
    assert not torch.equal(seen["output"], plain)
    torch.testing.assert_close(seen["output"], expected, atol=1e-6, rtol=0)


def test_adapter_is_not_mergeable_and_merge_artifact_refuses(tiny_model_dirs, tmp_path):
    from microtune.cli import run

    folder = tiny_model_dirs["bert"]
    backbone, tokenizer = load_backbone(str(folder))
    base_fingerprint = fingerprint(backbone)
    model = TaskModel(backbone, HeadConfig(num_labels=2), build_method("adapter"))
    with pytest.raises(MicrotuneError, match="cannot be merged"):
        model.merge()
    save_artifact(
        tmp_path / "artifact",
        model,
        method_name="adapter",
        base_model=str(folder),
        base_fingerprint=base_fingerprint,
        task=task_record(get_task("sst2")),
        max_length=32,
    )
    with pytest.raises(MicrotuneError, match="cannot fold into the base weights"):
        merge_artifact(tmp_path / "artifact", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert run(["info"])["methods"]["adapter"]["mergeable"] is False
    assert run(["info", "--artifact", str(tmp_path / "artifact")])["mergeable"] is False


def test_adapter_config_errors_are_one_line():
    for options, fragment in (
        ({"adapter_type": "parallel"}, "adapter_type 'parallel' unknown"),
        ({"activation": "softmax"}, "activation 'softmax' unknown"),
        ({"bottleneck": -1}, "bottleneck must be >= 0"),
        ({"reduction_factor": 0}, "reduction_factor must be a positive integer"),
    ):
        with pytest.raises(MicrotuneError, match=fragment):
            build_method("adapter", options)


# --- the CLI picks the options up from the config dataclasses --------------------------------


def test_cli_method_options_come_from_the_configs():
    from microtune.cli import _method_options, build_parser

    parser = build_parser()
    common = ["train", "--task", "sst2", "--output", "out"]
    args = parser.parse_args(
        [*common, "--method", "lora", "--rank", "4", "--target-modules", "query,key"]
    )
    assert _method_options(args) == {"rank": 4, "target_modules": "query,key"}
    args = parser.parse_args([*common, "--method", "adapter", "--adapter-type", "pfeiffer"])
    assert _method_options(args) == {"adapter_type": "pfeiffer"}
    args = parser.parse_args([*common, "--method", "slash", "--lora-dropout", "0.1"])
    with pytest.raises(MicrotuneError, match="--lora-dropout does not apply to method 'slash'"):
        _method_options(args)
