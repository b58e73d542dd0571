"""Prompt positions in front of the input: the machinery WARP and JR-WARP share.

`run_backbone` prepends k placeholder tokens (attention mask 1; the real tokens keep the
position ids they would have had without the prompt), a forward pre-hook on block 0 replaces
the placeholders' hidden states with the prompt vectors (so a prompt carries no position or
token-type embedding), pre-hooks on later blocks may add to the prompt positions, and the prompt
positions are dropped from the output again, so read-outs index the original tokens.
"""

from __future__ import annotations

import abc
import sys
from functools import partial
from typing import Any

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.methods.base import Method


def original_position_ids(backbone: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids the backbone would use for `input_ids` (right-padded) on its own."""
    embeddings = getattr(backbone, "embeddings", None)
    # RoBERTa family (a method) and MPNet (a function of the modeling module): positions
    # counted from padding_idx + 1, padding tokens at padding_idx.
    from_ids = getattr(embeddings, "create_position_ids_from_input_ids", None) or getattr(
        sys.modules.get(type(embeddings).__module__), "create_position_ids_from_input_ids", None
    )
    if from_ids is not None and hasattr(embeddings, "padding_idx"):
        return from_ids(input_ids, embeddings.padding_idx)
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(batch, length)


def _hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


@torch.no_grad()
def block_inputs(backbone: nn.Module, arch: ArchSpec, token_ids: torch.Tensor) -> torch.Tensor:
    """(k, D): the hidden state entering block 0 for each token, each as a 1-token sequence."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        captured["hidden"] = _hidden_of(args, kwargs)
        raise _StopForward

    handle = arch.blocks_of(backbone)[0].register_forward_pre_hook(capture, with_kwargs=True)
    was_training = backbone.training
    backbone.eval()
    ids = token_ids.reshape(-1, 1)
    try:
        backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _StopForward:
        pass
    finally:
        handle.remove()
        backbone.train(was_training)
    return captured["hidden"][:, 0]


class PromptMethod(Method):
    """Base of methods that prepend prompt positions (WARP, JR-WARP).

    Subclasses set `num_prompts`, call `attach_prompts` from `attach`, and implement
    `layer_prompts`.
    """

    num_prompts: int
    mergeable = False

    @abc.abstractmethod
    def layer_prompts(self) -> dict[int, torch.Tensor]:
        """Prompt vectors (k, D) by block index, for one forward pass.

        Block 0's vectors replace the placeholders; a later block's vectors are added to the
        prompt positions before that block runs. Blocks not in the dict leave them alone.
        """

    def attach_prompts(self, backbone: nn.Module, arch: ArchSpec) -> None:
        self._takes_token_types = arch.token_type_ids
        self._causal = arch.causal
        self._active: dict[int, torch.Tensor] | None = None  # set only inside run_backbone
        for layer, block in enumerate(arch.blocks_of(backbone)):
            hook = partial(self._at_block, layer)
            self._hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        pooler = _optional_submodule(backbone, arch.pooler)
        if pooler is not None:
            # BERT's pooler reads position 0: make that the real [CLS] again.
            self._hooks.append(pooler.register_forward_pre_hook(self._drop_prompts))

    def run_backbone(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, k = input_ids.shape[0], self.num_prompts

        def prepend(tensor: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
            return torch.cat([column.expand(batch, k), tensor], dim=1)

        positions = original_position_ids(backbone, input_ids)
        extended: dict[str, Any] = {
            # Placeholder ids are any valid id: block 0 overwrites their hidden states.
            "input_ids": prepend(input_ids, input_ids[:, :1]),
            "attention_mask": prepend(attention_mask, torch.ones_like(attention_mask[:, :1])),
            # A prompt's position id matters only to rotary models (Llama), where the first
            # position's id (0: no rotation) is the natural "no position".
            "position_ids": prepend(positions, positions[:, :1]),
        }
        if self._takes_token_types:
            types = inputs.get("token_type_ids", torch.zeros_like(input_ids))
            # Always explicit: BERT's default slices a buffer by the (now longer) length.
            extended["token_type_ids"] = prepend(types, torch.zeros_like(types[:, :1]))
        if self._causal:
            extended["use_cache"] = False
        self._active = self.layer_prompts()
        try:
            outputs = backbone(**extended)
        finally:
            self._active = None
        outputs.last_hidden_state = outputs.last_hidden_state[:, k:]
        return outputs

    def _at_block(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        prompt = None if self._active is None else self._active.get(layer)
        if prompt is None:
            return None
        hidden = _hidden_of(args, kwargs)
        k = self.num_prompts
        if layer == 0:
            head = prompt.to(hidden.dtype).expand(hidden.shape[0], k, hidden.shape[-1])
        else:  # summed in float32, rounded once to the activation's dtype
            head = (hidden[:, :k] + prompt).to(hidden.dtype)
        return _with_hidden(args, kwargs, torch.cat([head, hidden[:, k:]], dim=1))

    def _drop_prompts(self, module: nn.Module, args: tuple):
        if self._active is None:
            return None
        return (args[0][:, self.num_prompts :], *args[1:])


def _optional_submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        module = root.get_submodule(path)
    except AttributeError:  # e.g. BERT loaded with add_pooling_layer=False
        return None
    return module if isinstance(module, nn.Module) else None
