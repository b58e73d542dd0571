"""Float32 master copies of backbone tensors that train, for a base loaded in lower precision.

A method that trains the base's own tensors (BitFit's biases, full fine-tuning's weights) trains
them in place while the base is float32. With `--dtype bfloat16|float16` the base's tensors
cannot train in place: AdamW's updates fall below their resolution, and the optimizer state
would be low-precision too. Then the method holds a float32 copy of each such tensor (its
trainable parameter), and every forward pass substitutes the copy, cast to the base's dtype,
through `torch.func.functional_call`: the backbone is never modified while training, and
merging writes exactly the cast values the forward pass used (merged and unmerged logits agree
bit for bit). The artifact stores the copies under the backbone names (`backbone.<name>`), as
a float32 base would: its layout does not depend on the precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from microtune.methods.base import Method, MethodConfig, copy_matching


def needs_masters(parameters: list[nn.Parameter]) -> bool:
    """Whether any of these backbone tensors is stored below float32 (then all get copies)."""
    return any(p.dtype != torch.float32 for p in parameters)


class Float32Masters(nn.Module):
    """Float32 trainable copies of named backbone parameters (which stay frozen)."""

    def __init__(self, backbone: nn.Module, names: list[str]):
        super().__init__()
        parameters = dict(backbone.named_parameters())
        # ParameterDict keys cannot hold dots; the backbone name is kept beside each key.
        self.tensors = nn.ParameterDict(
            {
                name.replace(".", "-"): nn.Parameter(parameters[name].detach().float().clone())
                for name in names
            }
        )
        self._targets = {name.replace(".", "-"): (name, parameters[name]) for name in names}

    def substitutes(self) -> dict[str, torch.Tensor]:
        """Each copy in its backbone tensor's dtype, by backbone name (differentiable)."""
        return {
            name: self.tensors[key].to(target.dtype)
            for key, (name, target) in self._targets.items()
        }

    def run(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        """The backbone's forward pass with the copies in place of its tensors."""
        return functional_call(backbone, self.substitutes(), args=(), kwargs=inputs)

    @torch.no_grad()
    def write(self) -> None:
        """Round each copy into its backbone tensor (what `run` computes with)."""
        for key, (_, target) in self._targets.items():
            target.copy_(self.tensors[key])

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The copies under the names a float32 base would train them: "backbone.<name>"."""
        return {f"backbone.{name}": self.tensors[key] for key, (name, _) in self._targets.items()}

    def load_stored_state(self, stored: dict[str, torch.Tensor]) -> None:
        copy_matching(stored, self.stored_state())


class BackboneTensorMethod(Method):
    """Base of methods that train the backbone's own tensors (BitFit, full fine-tuning): in
    place on a float32 base, through `Float32Masters` on a lower-precision one."""

    def __init__(self, config: MethodConfig):
        super().__init__(config)
        self.masters: Float32Masters | None = None

    def train_backbone_tensors(self, backbone: nn.Module, names: list[str]) -> None:
        """Make these backbone parameters (by name) what trains."""
        parameters = dict(backbone.named_parameters())
        chosen = [parameters[name] for name in names]
        if needs_masters(chosen):
            self.masters = Float32Masters(backbone, names)
            return
        for parameter in chosen:
            parameter.requires_grad_(True)

    def run_backbone(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        if self.masters is None:
            return backbone(**inputs)
        return self.masters.run(backbone, **inputs)

    def stored_state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(trainable) if self.masters is None else self.masters.stored_state()

    def load_stored_state(
        self,
        stored: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        metadata: dict[str, Any],
    ) -> None:
        if self.masters is None:
            copy_matching(stored, trainable)
        else:
            self.masters.load_stored_state(stored)

    def merge_backbone_tensors(self, backbone: nn.Module) -> None:
        """Write the copies into the backbone (a no-op in place) and freeze it again."""
        if self.masters is not None:
            self.masters.write()
            self.masters = None
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
