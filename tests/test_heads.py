"""Read-outs pick the right hidden states."""

import pytest
import torch

from microtune.backbone.load import load_backbone
from microtune.errors import MicrotuneError
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.heads import read_out

from .conftest import tiny_batch


def test_each_readout_on_a_padded_batch():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.tensor([[2, 9, 4, 3], [2, 4, 0, 0]])
    assert torch.equal(read_out("first", hidden, mask, ids), hidden[:, 0])
    assert torch.equal(
        read_out("last", hidden, mask, ids), torch.stack([hidden[0, 3], hidden[1, 1]])
    )
    assert torch.allclose(
        read_out("mean", hidden, mask, ids), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])
    )
    assert torch.equal(
        read_out("mask", hidden, mask, ids, mask_token_id=4),
        torch.stack([hidden[0, 2], hidden[1, 1]]),
    )
    with pytest.raises(ValueError, match="an example has no mask token"):
        read_out("mask", hidden, mask, ids, mask_token_id=9)


@pytest.mark.parametrize("readout", ["first", "mean", "last"])
def test_padding_does_not_change_an_example(readout, tiny_model_dirs):
    backbone, tokenizer = load_backbone(str(tiny_model_dirs["bert"]))
    model = TaskModel(backbone, HeadConfig(num_labels=2, readout=readout)).eval()
    batch = tiny_batch(tokenizer)
    alone = tokenizer(["love it"], return_tensors="pt")
    with torch.no_grad():
        in_batch = model(**batch)[2]
        by_itself = model(**alone)[0]
    assert torch.allclose(in_batch, by_itself, atol=1e-5)


def test_pooler_readout_needs_a_pooler(tiny_model_dirs):
    backbone, _ = load_backbone(str(tiny_model_dirs["gpt2"]))
    with pytest.raises(MicrotuneError, match="gpt2 has no pooler"):
        TaskModel(backbone, HeadConfig(num_labels=2, readout="pooler"))
    with pytest.raises(MicrotuneError, match="read-out 'cls' is unknown"):
        HeadConfig(num_labels=2, readout="cls")
