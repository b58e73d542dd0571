"""The architecture map finds every part of every supported family."""

import pytest
from torch import nn
from transformers import AutoModel

from microtune.arch import ARCHITECTURES, UnsupportedModelError, arch_for, output_dim

from .conftest import ARCH_TYPES, TINY_CONFIGS

PARTS = ("attn_out", "ffn_in", "ffn_out")


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_every_part_resolves(model_type):
    config = TINY_CONFIGS[model_type]()
    backbone = AutoModel.from_config(config)
    arch = arch_for(backbone)
    assert arch.num_layers(backbone) == 2
    hidden = 32
    for layer in range(2):
        assert output_dim(arch.block_part(backbone, layer, "ffn_out")) == hidden
        assert output_dim(arch.block_part(backbone, layer, "ffn_in")) == 48
        assert output_dim(arch.block_part(backbone, layer, "attn_out")) == hidden
        block = arch.blocks_of(backbone)[layer]
        for norm in arch.norms:
            assert output_dim(block.get_submodule(norm)) == hidden
        for projection in arch.attention:
            assert isinstance(block.get_submodule(projection), nn.Module)
        if arch.attn_norm:
            assert block.get_submodule(arch.attn_norm) is block.get_submodule(arch.norms[0])
    embeddings = backbone.get_submodule(arch.embeddings)
    assert embeddings is backbone.get_input_embeddings()
    assert (arch.pooler is not None) == (getattr(backbone, "pooler", None) is not None)


def test_map_covers_the_tested_families():
    assert set(ARCH_TYPES) == set(ARCHITECTURES)


def test_unsupported_type_is_one_line_listing_supported():
    with pytest.raises(UnsupportedModelError) as error:
        arch_for("t5")
    message = str(error.value)
    assert "\n" not in message
    assert "'t5' is not supported" in message
    for name in ARCHITECTURES:
        assert name in message
