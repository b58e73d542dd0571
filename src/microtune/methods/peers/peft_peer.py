"""The machinery every `peft` peer shares: peft loaded (or a one-line install hint), the
targets resolved through our `ArchSpec`, peft's tuner attached to the backbone the way
`get_peft_model` does it, merged or unloaded, and the frozen state checked on load."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from microtune.backbone.arch import ArchSpec, is_conv1d
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, copy_matching
from microtune.methods.configs.peers import PeerConfig, PeerState
from microtune.methods.lora import find_targets
from microtune.methods.peers.frozen import fingerprint, frozen_state

PEFT_INSTALL = "pip install 'microtune[peft]'"
ADAPTER = "default"  # peft's adapter name; one adapter per backbone


def require_peft(method: str, config_class: str) -> Any:
    """The peft module, or a one-line error naming the install command (and the version that
    has `config_class` when an older peft lacks it)."""
    try:
        import peft
    except ImportError:
        raise MicrotuneError(f"method '{method}' needs the peft library: {PEFT_INSTALL}") from None
    if not hasattr(peft, config_class):
        raise MicrotuneError(
            f"method '{method}' needs peft >= 0.21 (installed: {peft.__version__}): "
            f"pip install -U 'microtune[peft]'"
        )
    return peft


def resolve_targets(method: str, backbone: nn.Module, patterns: str, default: list[str]):
    """Full paths of the target layers: the user's comma-separated patterns (as LoRA's
    `target_modules`), else `default` (full paths), in model order."""
    chosen = [p.strip() for p in patterns.split(",") if p.strip()] or default
    try:
        return [path for path, _ in find_targets(backbone, chosen)]
    except MicrotuneError as error:
        raise MicrotuneError(f"{method}: {str(error).removeprefix('lora: ')}") from None


def block_paths(backbone: nn.Module, arch: ArchSpec, parts: list[str]) -> list[str]:
    """Full paths of block-relative `parts` in every block (a suffix such as BERT's
    "output.dense" would also match "attention.output.dense")."""
    blocks = range(arch.num_layers(backbone))
    return [f"{arch.blocks}.{i}.{part}" for i in blocks for part in dict.fromkeys(parts)]


class PeftPeer(Method):
    """A peft tuner attached to the backbone; subclasses name the peft config and its options."""

    peft_config_class: ClassVar[str]  # e.g. "VeraConfig"
    state_schema = PeerState  # what `stored_metadata` records when peft holds frozen state
    # False where peft's tuner takes only nn.Linear (not GPT-2's Conv1D).
    supports_conv1d: ClassVar[bool] = True

    def __init__(self, config: PeerConfig):
        super().__init__(config)
        require_peft(self.name, self.peft_config_class)
        # peft's tuner wraps the backbone: kept outside the module tree (its parameters are
        # the backbone's, already registered under `backbone.`).
        object.__setattr__(self, "_tuner", None)
        object.__setattr__(self, "_backbone", None)

    # -- what each peer decides ----------------------------------------------------------

    def default_targets(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """Full paths; peft's default for BERT-like models: attention query and value."""
        query, _, value = arch.attention
        return block_paths(backbone, arch, [query, value])

    def peft_options(self, backbone: nn.Module, arch: ArchSpec, targets: list[str]) -> dict:
        """The peft config's options besides `target_modules` (and `fan_in_fan_out`)."""
        return {}

    # -- attaching, merging --------------------------------------------------------------

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        peft = require_peft(self.name, self.peft_config_class)
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        targets = resolve_targets(
            self.name, backbone, self.config.target_modules, self.default_targets(backbone, arch)
        )
        conv1d = [p for p in targets if is_conv1d(backbone.get_submodule(p))]
        if conv1d and not self.supports_conv1d:
            raise MicrotuneError(
                f"{self.name}: peft's {self.peft_config_class.removesuffix('Config')} adapts only "
                f"nn.Linear layers, but {conv1d[0]} is a Conv1D (GPT-2); use another method"
            )
        config_class = getattr(peft, self.peft_config_class)
        options = {"target_modules": targets, **self.peft_options(backbone, arch, targets)}
        if "fan_in_fan_out" in config_class.__dataclass_fields__:
            # GPT-2's Conv1D stores (in, out); peft needs the flag for such layers.
            options["fan_in_fan_out"] = bool(conv1d)
        with warnings.catch_warnings():
            # peft warns when its own checkpoints would not hold the frozen projections or
            # indices; microtune fingerprints and regenerates them instead.
            warnings.filterwarnings("ignore", message=".*(save_projection|save_precomputed)")
            try:
                peft_config = config_class(**options)
                tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
                tuner = tuner_class(backbone, peft_config, adapter_name=ADAPTER)
            except (ValueError, TypeError, RuntimeError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                raise MicrotuneError(f"{self.name}: peft refused this setting: {first}") from None
        # Adapter tensors train in float32 on a bfloat16/float16 base, as get_peft_model does.
        tuner._cast_adapter_dtype(ADAPTER, autocast_adapter_dtype=True)
        object.__setattr__(self, "_tuner", tuner)
        object.__setattr__(self, "_backbone", backbone)

    def _release(self, merge: bool) -> None:
        if self._tuner is None:
            raise MicrotuneError(f"{self.name}: not attached (already merged or detached)")
        backbone = self._tuner.merge_and_unload() if merge else self._tuner.unload()
        if backbone is not self._backbone:  # merged in place, or the merge is not ours
            raise MicrotuneError(
                f"{self.name}: peft returned another model than it was given; this peft "
                "version is not supported (pip install 'peft>=0.21')"
            )
        # BaseTuner leaves its config on the model; the merged backbone is a stock model.
        backbone.__dict__.pop("peft_config", None)
        object.__setattr__(self, "_tuner", None)

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """peft's `merge_and_unload`: every adapter folded into its layer's weight (and bias,
        for (IA)³ on non-FFN layers that have one), peft's wrappers replaced by the originals."""
        self._release(merge=True)
        return []

    def detach(self) -> None:
        """Remove the adapters without merging (peft's `unload`): the base model as it was."""
        if self._tuner is not None:
            self._release(merge=False)
        super().detach()

    # -- the frozen state: regenerated, fingerprinted, never stored ------------------------

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Every tensor peft's layers hold for the adapter that does not train (projections,
        indices, SVD factors), by layer path and attribute."""
        return frozen_state(self._backbone, ADAPTER)

    def frozen_fingerprint(self) -> str | None:
        """SHA-256 over the frozen state's names, dtypes, shapes and bytes; None if empty."""
        return fingerprint(self.frozen_state())

    def stored_metadata(self) -> dict[str, Any]:
        fingerprint = self.frozen_fingerprint()
        return {} if fingerprint is None else {"frozen_fingerprint": fingerprint}

    def load_stored_state(
        self,
        stored: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        metadata: dict[str, Any],
    ) -> None:
        found = self.frozen_fingerprint()
        expected = metadata.get("frozen_fingerprint")
        if found != expected:
            raise MicrotuneError(
                f"{self.name}: the frozen state regenerated from this base model and peft "
                f"({str(found)[:19]}…) differs from the artifact's ({str(expected)[:19]}…); "
                "load it with the original base model and peft version"
            )
        copy_matching(stored, trainable)
