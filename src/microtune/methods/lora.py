"""LoRA (Hu et al., ICLR 2022): a trainable low-rank update B A on frozen weight matrices.

A target layer computes y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ, with A (rank, in)
and B (out, rank). A starts Kaiming-uniform (as `nn.Linear`), B at zero, so training starts
at the pretrained function. The update is added by a forward hook on the untouched layer (as
SLaSh adds its shift), so module types and parameter names never change; `merge` adds
(alpha / rank) B A to the weight (transposed for GPT-2's Conv1D, whose weight is (in, out)) and
removes the hooks, leaving a stock `transformers` model. `unmerge` subtracts it again.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, is_conv1d
from microtune.errors import MicrotuneError
from microtune.methods.base import Method
from microtune.methods.configs.lora import LoRAConfig


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"LoRA needs a Linear or Conv1D layer, got {type(module).__name__}")


def default_targets(arch: ArchSpec) -> list[str]:
    """Attention query and value, as block-relative paths (deduplicated: GPT-2 fuses them)."""
    query, _, value = arch.attention
    return list(dict.fromkeys((query, value)))


def find_targets(backbone: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """Every Linear/Conv1D whose path matches a pattern; a one-line error for a bad pattern."""
    found = []
    for pattern in patterns:
        matches = [
            (path, module)
            for path, module in backbone.named_modules()
            if path == pattern or path.endswith("." + pattern)
        ]
        if not matches:
            raise MicrotuneError(f"lora: target '{pattern}' matches no layer of this model")
        for path, module in matches:
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise MicrotuneError(
                    f"lora: target '{pattern}' matches {path} ({type(module).__name__}), "
                    "which is not a Linear or Conv1D layer"
                )
        found += matches
    # Keep model order, drop layers named by two patterns.
    order = {path: i for i, (path, _) in enumerate(backbone.named_modules())}
    unique = dict(sorted(found, key=lambda item: order[item[0]]))
    return list(unique.items())


class LoRAFactors(nn.Module):
    """A (rank, in) and B (out, rank) of one target layer."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's (and peft's) init

    def delta(self) -> torch.Tensor:
        """B A: the update of a Linear weight (out, in)."""
        return self.B @ self.A


class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    default_learning_rate = 5e-4
    mixed_batch = "lora"

    def __init__(self, config: LoRAConfig):
        super().__init__(config)
        self.factors = nn.ModuleDict()
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self._targets: dict[str, nn.Module] = {}  # factor key -> layer (not a submodule)
        self._paths: dict[str, str] = {}  # factor key -> the layer's path in the backbone
        self.merged = False

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        patterns = [p.strip() for p in self.config.target_modules.split(",") if p.strip()]
        targets = find_targets(backbone, patterns or default_targets(arch))
        device = next(backbone.parameters()).device
        for path, module in targets:
            key = path.replace(".", "-")  # ModuleDict keys cannot contain dots
            self.factors[key] = LoRAFactors(*in_out_features(module), self.config.rank)
            self._targets[key] = module
            self._paths[key] = path
        self.to(device)
        self._add_hooks()

    def _add_hooks(self) -> None:
        for key, module in self._targets.items():
            self._hooks.append(module.register_forward_hook(partial(self._add_update, key)))

    def _add_update(self, key: str, module: nn.Module, inputs, output: torch.Tensor):
        factors = self.factors[key]
        x = inputs[0].to(factors.A.dtype)
        if self.config.lora_dropout > 0:  # p = 0 is the identity: skip the call (as peft does)
            x = self.lora_dropout(x)
        update = nn.functional.linear(nn.functional.linear(x, factors.A), factors.B)  # x Aᵀ Bᵀ
        # Summed in float32 and rounded once to the activation's dtype, as peft does.
        return (output + self.config.scale * update).to(output.dtype)

    def target_paths(self) -> list[str]:
        return list(self._paths.values())

    def low_rank_rows(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            path: (
                self.factors[key].A.detach().clone(),
                (self.config.scale * self.factors[key].B.detach()).clone(),
            )
            for key, path in self._paths.items()
        }

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        for key, module in self._targets.items():
            delta = sign * self.config.scale * self.factors[key].delta()
            weight = module.weight
            # Summed in float32, rounded once to the base's dtype.
            weight.copy_(weight + (delta.T if is_conv1d(module) else delta))

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """W += (alpha / rank) B A on every target; the hooks go, the module types never changed."""
        if self.merged:
            raise MicrotuneError("lora: already merged")
        self._fold(+1.0)
        self.detach()
        self.merged = True
        return []

    def unmerge(self) -> None:
        """Undo `merge`: W -= (alpha / rank) B A and put the hooks back (exact up to rounding)."""
        if not self.merged:
            raise MicrotuneError("lora: not merged, nothing to unmerge")
        self._fold(-1.0)
        self._add_hooks()
        self.merged = False
