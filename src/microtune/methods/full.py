"""Full fine-tuning: every backbone parameter trains. The trained backbone is the merged model.

On a base loaded below float32 (`--dtype bfloat16`) the weights train as float32 master copies
(`microtune.methods.masters`), the usual mixed-precision recipe: it costs a float32 copy of the
model plus AdamW's state, so the low-precision base saves memory only in the forward pass.
"""

from __future__ import annotations

from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.methods.configs.full import FullConfig
from microtune.methods.masters import BackboneTensorMethod


class Full(BackboneTensorMethod):
    """Trains the whole backbone. The artifact stores every backbone weight (and the head)."""

    name = "full"
    config_class = FullConfig
    default_learning_rate = 2e-5

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        self.train_backbone_tensors(backbone, [name for name, _ in backbone.named_parameters()])

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        # The weights already are the model (or their copies are written into it); freeze them
        # again so the result is inference-only.
        self.merge_backbone_tensors(backbone)
        return []
