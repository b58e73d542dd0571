"""The frozen state of a peft tuner: every tensor its layers hold for the adapter that does not
train (VeRA's shared projections, Uni-LoRA's index map, TinyLoRA's SVD factors, SHiRA's mask...).
It is regenerated on attach from the base weights and the seeds, never stored; its SHA-256 in
`microtune.json` lets a load refuse an artifact whose regenerated state differs."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def frozen_state(backbone: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The frozen tensors peft's layers in `backbone` hold for `adapter`, by layer path and
    attribute."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    frozen = {}
    for path, module in backbone.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attribute in module.other_param_names:
            holder = getattr(module, attribute, None)
            # dicts, BufferDicts and ModuleDicts keyed by adapter name; scalars are not state
            has_adapter = hasattr(holder, "keys") and adapter in holder
            value = holder[adapter] if has_adapter else None
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                frozen[f"{path}.{attribute}"] = value
    return frozen


def fingerprint(tensors: dict[str, torch.Tensor]) -> str | None:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes; None if there are none."""
    if not tensors:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
