"""The seven `peft` peers: which peft config each builds, from which of our options, and
what differs from the shared machinery (targets, Conv1D support, learning rate)."""

from __future__ import annotations

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec
from microtune.errors import MicrotuneError
from microtune.methods.configs.peers import (
    PeftIA3Config,
    PeftLoRAConfig,
    PeftSHiRAConfig,
    PeftSuperTuningConfig,
    PeftTinyLoRAConfig,
    PeftUniLoRAConfig,
    PeftVeRAConfig,
)
from microtune.methods.peers.peft_peer import PeftPeer, block_paths, resolve_targets


class PeftLoRA(PeftPeer):
    name = "peft-lora"
    config_class = PeftLoRAConfig
    peft_config_class = "LoraConfig"
    default_learning_rate = 5e-4  # the LoRA paper's RoBERTa-base GLUE rate (SST-2, RTE)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {"r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.lora_dropout}


class PeftVeRA(PeftPeer):
    name = "peft-vera"
    config_class = PeftVeRAConfig
    peft_config_class = "VeraConfig"
    default_learning_rate = 4e-3  # the VeRA paper's RoBERTa-base rate (SST-2, MRPC)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "d_initial": c.d_initial,
            "projection_prng_key": c.projection_seed,
            "save_projection": False,
        }


class PeftIA3(PeftPeer):
    name = "peft-ia3"
    config_class = PeftIA3Config
    peft_config_class = "IA3Config"
    default_learning_rate = 3e-3  # the (IA)³ paper's (T-Few) rate

    def default_targets(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        _, key, value = arch.attention
        return block_paths(backbone, arch, [key, value, arch.ffn_out])

    def peft_options(self, backbone, arch, targets) -> dict:
        patterns = [p.strip() for p in self.config.feedforward_modules.split(",") if p.strip()]
        if patterns:
            feedforward = resolve_targets(self.name, backbone, ",".join(patterns), [])
        else:
            ffn = set(block_paths(backbone, arch, [arch.ffn_out]))
            feedforward = [t for t in targets if t in ffn]
        outside = sorted(set(feedforward) - set(targets))
        if outside:
            raise MicrotuneError(
                f"peft-ia3: feedforward module {outside[0]} is not among the targets; add it "
                "to --target-modules"
            )
        return {"feedforward_modules": feedforward}


class PeftUniLoRA(PeftPeer):
    name = "peft-unilora"
    config_class = PeftUniLoRAConfig
    peft_config_class = "UniLoraConfig"
    default_learning_rate = 2e-3  # peft's method-comparison Uni-LoRA run (r4, lr 0.002)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "theta_d_length": c.theta_d_length,
            "proj_seed": c.projection_seed,
            "save_indices": False,
        }


class PeftTinyLoRA(PeftPeer):
    name = "peft-tinylora"
    config_class = PeftTinyLoRAConfig
    peft_config_class = "TinyLoraConfig"
    default_learning_rate = 1e-3  # peft's method-comparison TinyLoRA run (lr 1e-3)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "u": c.u,
            "weight_tying": c.weight_tying,
            "projection_seed": c.projection_seed,
            "save_projection": False,
        }


class PeftSHiRA(PeftPeer):
    name = "peft-shira"
    config_class = PeftSHiRAConfig
    peft_config_class = "ShiraConfig"
    supports_conv1d = False
    default_learning_rate = 3e-4  # peft's method-comparison SHiRA run (lr 0.0003)

    def peft_options(self, backbone, arch, targets) -> dict:
        return {"r": self.config.rank, "random_seed": self.config.mask_seed}

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        super().attach(backbone, arch)
        # SHiRA's update is a sparse COO tensor; torch warns on each run that its invariant
        # checks are "implicitly" off. Saying so explicitly changes nothing else (off is the
        # default) and keeps the warning out of every training log.
        torch.sparse.check_sparse_tensor_invariants.disable()


class PeftSuperTuning(PeftPeer):
    name = "peft-supertuning"
    config_class = PeftSuperTuningConfig
    peft_config_class = "SupertuningConfig"
    supports_conv1d = False
    # PaFi's (its closest relative, chosen on an SST-2 slice); peft's suite runs it at its
    # default 1e-4 on Llama-3.2-3B, which is too small for a 22M encoder.
    default_learning_rate = 1e-3

    def peft_options(self, backbone, arch, targets) -> dict:
        return {
            "sparsity": self.config.sparsity,
            "select_top": self.config.select_top,
            "save_precomputed_indices": False,
        }


PEERS: tuple[type[PeftPeer], ...] = (
    PeftLoRA,
    PeftVeRA,
    PeftIA3,
    PeftUniLoRA,
    PeftTinyLoRA,
    PeftSHiRA,
    PeftSuperTuning,
)
