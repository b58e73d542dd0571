"""peft configs of microtune's methods: each is a `peft.PeftConfig` AND the method's own config.

`SlashConfig` subclasses both `peft.PeftConfig` and `microtune.methods.configs.slash.SLaShConfig`,
so its fields are the method's (with their help and their checks) plus peft's own and the few
that every microtune tuner needs (`modules_to_save`, `base_fingerprint`). `method_options()`
gives back exactly the method config's fields, which `microtune.methods.build_method` takes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft import PeftConfig

from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig
from microtune.methods.configs.hiwi import HiWiConfig as _HiWiOptions
from microtune.methods.configs.jrwarp import JRWARPConfig as _JRWarpOptions
from microtune.methods.configs.pafi import PaFiConfig as _PaFiOptions
from microtune.methods.configs.slash import SLaShConfig as _SlashOptions


@dataclass
class MicrotunePeftConfig(PeftConfig):
    """The fields every microtune tuner adds to peft's (the method's come from its config)."""

    # The microtune method (registry name) and its options class; set by each subclass.
    method_name: ClassVar[str]
    options_class: ClassVar[type[MethodConfig]]

    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "modules besides the method that train and are saved, e.g. a task head; peft "
                'adds "classifier" and "score" itself for task_type="SEQ_CLS".'
            )
        },
    )
    base_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": (
                "SHA-256 of the base model's backbone weights, recorded by the tuner when the "
                "method is attached; `microtune.peft.to_artifact` checks the base against it."
            )
        },
    )

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        self.options_class.__post_init__(self)  # the method's own checks
        self.peft_type = peft_type_of(self.method_name)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.options_class)]

    def method_options(self) -> dict[str, Any]:
        """The method config's fields and values, as `build_method` takes them."""
        return {name: getattr(self, name) for name in self.option_names()}


def peft_type_of(method_name: str) -> str:
    """The peft type string of a microtune method: cannot collide with peft's `PeftType`."""
    return f"MICROTUNE_{method_name.upper()}"


@dataclass
class SlashConfig(MicrotunePeftConfig, _SlashOptions):
    """SLaSh in peft: one trainable vector z shifts every block (`microtune.methods.slash`)."""

    method_name: ClassVar[str] = "slash"
    options_class: ClassVar[type[MethodConfig]] = _SlashOptions


@dataclass
class JRWarpConfig(MicrotunePeftConfig, _JRWarpOptions):
    """JR-WARP in peft: one prompt position driven by z (`microtune.methods.jrwarp`)."""

    method_name: ClassVar[str] = "jrwarp"
    options_class: ClassVar[type[MethodConfig]] = _JRWarpOptions


@dataclass
class PaFiConfig(MicrotunePeftConfig, _PaFiOptions):
    """PaFi in peft: the k smallest pretrained weights train (`microtune.methods.pafi`)."""

    method_name: ClassVar[str] = "pafi"
    options_class: ClassVar[type[MethodConfig]] = _PaFiOptions


@dataclass
class HiWiConfig(MicrotunePeftConfig, _HiWiOptions):
    """HiWi in peft: adapters on the FFN's pretrained parameters (`microtune.methods.hiwi`)."""

    method_name: ClassVar[str] = "hiwi"
    options_class: ClassVar[type[MethodConfig]] = _HiWiOptions


CONFIGS: tuple[type[MicrotunePeftConfig], ...] = (SlashConfig, JRWarpConfig, PaFiConfig, HiWiConfig)


def config_class_of(method_name: str) -> type[MicrotunePeftConfig]:
    """The peft config class of a microtune method ("slash" -> `SlashConfig`)."""
    for config_class in CONFIGS:
        if config_class.method_name == method_name:
            return config_class
    names = ", ".join(c.method_name for c in CONFIGS)
    raise MicrotuneError(f"'{method_name}' has no peft config; microtune.peft holds {names}")
