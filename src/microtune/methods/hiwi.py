"""HiWi (Liao, Meng, Monz, ACL 2023): an adapter whose input is a pretrained FFN parameter.

For a parameter P whose last dimension is n, P' = P + f(P A) B with A (n, r) initialised as
`nn.Linear` initialises a weight, B (r, n) at zero, f an activation (methods.md §5). One adapter
per block and per target; the targets are the arch parts `ffn_in` and `ffn_out` (Llama: gate
and down projections):

- "bias" (default): P = the FFN biases b1 (length F) and b2 (length D).
- "weight": P = the FFN weights W1, W2 taken as (in, out), i.e. one row per input dimension,
  each row of length n = out passed through the adapter (for `nn.Linear`, whose weight is
  stored (out, in), P = Wᵀ; GPT-2's Conv1D already stores (in, out)). A is (out, r), as for the
  bias of the same layer.

The forward pass runs the backbone through `torch.func.functional_call` with P' in place of P,
so the backbone is never modified or subclassed and computes exactly what the merged model
computes. Merging writes P' into the model and discards the adapter.

What the artifact stores: the bias variant stores only the new biases P' (L (F + D) numbers,
whatever r is; named as the backbone biases, "backbone.<path>.bias"), and loading writes them
into the model without rebuilding the adapter. The weight variant stores A and B (the default
contract; far smaller than the dense W') and recomputes W' at load.

A model whose FFN has no bias (Llama) cannot use the bias variant: a created zero bias gives
P A = 0, and f(0) = 0 for every offered activation, so P' would stay 0 and nothing would train.
It is refused with a pointer to the weight variant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from microtune.backbone.arch import ArchSpec, is_conv1d
from microtune.errors import MicrotuneError
from microtune.methods.adapter import ACTIVATIONS
from microtune.methods.base import Method, copy_matching
from microtune.methods.configs.hiwi import VARIANTS as VARIANTS  # re-exported
from microtune.methods.configs.hiwi import HiWiConfig

TARGETS = ("ffn_in", "ffn_out")


class ParameterAdapter(nn.Module):
    """P ↦ P + f(P A) B for a parameter P whose last dimension is n."""

    def __init__(self, n: int, r: int, activation: str):
        super().__init__()
        bound = 1 / math.sqrt(n)  # nn.Linear(n, r)'s weight init: U(-1/sqrt(n), 1/sqrt(n))
        self.A = nn.Parameter(torch.empty(n, r).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(r, n))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, parameter: torch.Tensor) -> torch.Tensor:
        p = parameter.to(self.A.dtype)
        return (p + self.activation(p @ self.A) @ self.B).to(parameter.dtype)


class HiWi(Method):
    """Adapters on the FFN parameters of every block; merges by writing P' into the model."""

    name = "hiwi"
    config_class = HiWiConfig
    default_learning_rate = 1e-3

    def __init__(self, config: HiWiConfig):
        super().__init__(config)
        self.adapters = nn.ModuleDict()
        # adapter key -> (parameter's name in the backbone, its layer); layers are not submodules
        self._targets: dict[str, tuple[str, nn.Module]] = {}
        self.served = False  # True once the biases P' sit in the model (loaded or merged)

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        attribute = self.config.variant  # "bias" or "weight"
        for layer in range(arch.num_layers(backbone)):
            for part in TARGETS:
                module = arch.block_part(backbone, layer, part)
                if getattr(module, attribute, None) is None:
                    raise MicrotuneError(
                        f"hiwi: {backbone.config.model_type}'s FFN has no biases to adapt (a "
                        "created zero bias gives f(0 A) B = 0, so nothing would train); "
                        "use --variant weight"
                    )
                name = f"{arch.blocks}.{layer}.{getattr(arch, part)}.{attribute}"
                n = getattr(module, attribute).shape[-1 if self._rows_as_stored(module) else 0]
                key = f"{layer}-{part}"
                self.adapters[key] = ParameterAdapter(n, self.config.r, self.config.activation)
                self._targets[key] = (name, module)
        self.to(next(backbone.parameters()).device)

    @classmethod
    def serving_join(cls, config: HiWiConfig) -> str:  # type: ignore[override]
        """The bias variant's P' are biases; the weight variant's cannot join."""
        return "bias" if config.variant == "bias" else "copy"

    def _rows_as_stored(self, module: nn.Module) -> bool:
        """Whether P is the stored tensor as is: biases, and Conv1D weights (in, out)."""
        return self.config.variant == "bias" or is_conv1d(module)

    def updated(self, key: str) -> torch.Tensor:
        """P' for one target, in the orientation the model stores it."""
        _, module = self._targets[key]
        stored = getattr(module, self.config.variant)
        if self._rows_as_stored(module):
            return self.adapters[key](stored)
        return self.adapters[key](stored.T).T  # nn.Linear weight (out, in): P = Wᵀ

    def updated_parameters(self) -> dict[str, torch.Tensor]:
        """P' for every target, by its name in the backbone (differentiable in A and B)."""
        return {name: self.updated(key) for key, (name, _) in self._targets.items()}

    def run_backbone(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        if self.served:
            return backbone(**inputs)
        return functional_call(backbone, self.updated_parameters(), args=(), kwargs=inputs)

    @torch.no_grad()
    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """Write P' into the model once and discard the adapters; no bias is ever created."""
        if not self.served:
            for key, (_, module) in self._targets.items():
                getattr(module, self.config.variant).copy_(self.updated(key))
            self._serve()
        return []

    def _serve(self) -> None:
        self.adapters = nn.ModuleDict()
        self.served = True

    @torch.no_grad()
    def adapter_state(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """A and B of every adapter ("adapters.<key>.A"), also once the bias variant is served:
        its P' then comes back as rank-one adapters on `base` (the unmodified backbone) that
        give P' from P exactly: A's first column P / |P|², so that f(P A) = (f(1), 0, ...), and
        B's first row (P' - P) / f(1)."""
        if not self.served:
            return {f"adapters.{n}": t.clone() for n, t in self.adapters.state_dict().items()}
        if self.config.variant != "bias":
            raise MicrotuneError("hiwi: merged weights hold no adapters; load the artifact again")
        one = ACTIVATIONS[self.config.activation]()(torch.ones(()))
        state = {}
        for key, (name, module) in self._targets.items():
            p = base.get_parameter(name).detach().float()
            updated = module.bias.detach().float()
            A, B = torch.zeros(p.numel(), self.config.r), torch.zeros(self.config.r, p.numel())
            squared = p.dot(p)
            if squared > 0:  # a zero P stays zero whatever B is: P' = P, and B = 0 says so
                A[:, 0], B[0] = p / squared, (updated - p) / one
            state[f"adapters.{key}.A"], state[f"adapters.{key}.B"] = A, B
        return state

    # -- what the artifact stores ------------------------------------------------------------

    def _bias_parameters(self) -> dict[str, torch.Tensor]:
        return {f"backbone.{name}": module.bias for name, module in self._targets.values()}

    def stored_state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.variant == "weight":
            return dict(trainable)
        if self.served:
            return self._bias_parameters()
        with torch.no_grad():
            return {f"backbone.{name}": p for name, p in self.updated_parameters().items()}

    def load_stored_state(
        self,
        stored: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        metadata: dict[str, Any],
    ) -> None:
        if self.config.variant == "weight":
            copy_matching(stored, trainable)
            return
        # The stored biases are P' itself: write them and serve without any adapter.
        copy_matching(stored, self._bias_parameters())
        self._serve()
