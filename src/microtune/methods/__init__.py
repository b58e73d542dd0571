"""The method registry: one line per method, naming its config class and where its layers live.

The configs are imported here; a method's layers (its `Method` class, which needs torch) only on
first use, like `transformers`' auto mappings: the command line reads every method's options
from the configs and must build its parser without importing torch. Adding a method is a config
in `configs/<name>.py`, the layers in `<name>.py`, and one line in `_BUILTIN` below (or one
`register_method` call from outside the package).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microtune.errors import MicrotuneError
from microtune.methods.configs.adapter import AdapterConfig
from microtune.methods.configs.base import MethodConfig
from microtune.methods.configs.bitfit import BitFitConfig
from microtune.methods.configs.full import FullConfig
from microtune.methods.configs.hiwi import HiWiConfig
from microtune.methods.configs.jrwarp import JRWARPConfig
from microtune.methods.configs.linear import LinearProbeConfig
from microtune.methods.configs.lora import LoRAConfig
from microtune.methods.configs.pafi import PaFiConfig
from microtune.methods.configs.peers import (
    PeftIA3Config,
    PeftLoRAConfig,
    PeftSHiRAConfig,
    PeftSuperTuningConfig,
    PeftTinyLoRAConfig,
    PeftUniLoRAConfig,
    PeftVeRAConfig,
)
from microtune.methods.configs.slash import SLaShConfig
from microtune.methods.configs.warp import WARPConfig

if TYPE_CHECKING:
    from microtune.methods.base import Method


@dataclass
class _Entry:
    config_class: type[MethodConfig]
    target: str | type[Method]  # "module:Class" until first use, then the class


_REGISTRY: dict[str, _Entry] = {}


def register_method(
    name: str, config_class: type[MethodConfig], method: str | type[Method]
) -> None:
    """Register a method: its name, its config class and its `Method` subclass, or where that
    lives as "package.module:Class" (imported on first use). A name is registered once."""
    if name in _REGISTRY:
        raise MicrotuneError(f"method '{name}' is already registered")
    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)):
        raise TypeError(f"method '{name}': {config_class!r} is not a MethodConfig subclass")
    if isinstance(method, str):
        module, _, attribute = method.partition(":")
        if not module or not attribute:
            raise ValueError(f"method '{name}': '{method}' is not of the form 'module:Class'")
    else:
        _check(name, config_class, method)
    _REGISTRY[name] = _Entry(config_class, method)


def unregister_method(name: str) -> None:
    """Forget a method registered with `register_method` (a test's toy method, say)."""
    _entry(name)
    del _REGISTRY[name]


def _check(name: str, config_class: type[MethodConfig], cls: Any) -> None:
    """The class is the one the registry line describes: same name, same config class."""
    if getattr(cls, "name", None) != name or getattr(cls, "config_class", None) is not config_class:
        raise TypeError(
            f"method '{name}': {cls!r} must set name = '{name}' and "
            f"config_class = {config_class.__name__}"
        )


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MicrotuneError(
            f"method '{name}' is unknown; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> list[str]:
    """Every registered method's name, sorted."""
    return sorted(_REGISTRY)


def method_config(name: str) -> type[MethodConfig]:
    """The config class of a method (imports no torch)."""
    return _entry(name).config_class


def method_class(name: str) -> type[Method]:
    """The `Method` class of a method, importing its module on first use."""
    entry = _entry(name)
    if isinstance(entry.target, str):
        module, _, attribute = entry.target.partition(":")
        cls = getattr(importlib.import_module(module), attribute)
        _check(name, entry.config_class, cls)
        entry.target = cls
    return entry.target


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from its name and config options (unknown options are an error)."""
    cls = method_class(name)
    return cls(cls.config_class.from_dict(options or {}))


class _Methods(Mapping):
    """name -> Method class, read-only; a class is imported when it is looked up."""

    def __getitem__(self, name: str) -> type[Method]:
        if name not in _REGISTRY:
            raise KeyError(name)
        return method_class(name)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({method_names()})"


METHODS: Mapping[str, type[Method]] = _Methods()

# name: (config class, where the Method class lives). peft-*: peft's tuners, whose layers need
# the optional peft dependency (their configs do not).
_BUILTIN: dict[str, tuple[type[MethodConfig], str]] = {
    "slash": (SLaShConfig, "microtune.methods.slash:SLaSh"),
    "jrwarp": (JRWARPConfig, "microtune.methods.jrwarp:JRWARP"),
    "warp": (WARPConfig, "microtune.methods.warp:WARP"),
    "full": (FullConfig, "microtune.methods.full:Full"),
    "linear": (LinearProbeConfig, "microtune.methods.linear:LinearProbe"),
    "bitfit": (BitFitConfig, "microtune.methods.bitfit:BitFit"),
    "lora": (LoRAConfig, "microtune.methods.lora:LoRA"),
    "adapter": (AdapterConfig, "microtune.methods.adapter:Adapter"),
    "pafi": (PaFiConfig, "microtune.methods.pafi:PaFi"),
    "hiwi": (HiWiConfig, "microtune.methods.hiwi:HiWi"),
    "peft-lora": (PeftLoRAConfig, "microtune.methods.peers.tuners:PeftLoRA"),
    "peft-vera": (PeftVeRAConfig, "microtune.methods.peers.tuners:PeftVeRA"),
    "peft-ia3": (PeftIA3Config, "microtune.methods.peers.tuners:PeftIA3"),
    "peft-unilora": (PeftUniLoRAConfig, "microtune.methods.peers.tuners:PeftUniLoRA"),
    "peft-tinylora": (PeftTinyLoRAConfig, "microtune.methods.peers.tuners:PeftTinyLoRA"),
    "peft-shira": (PeftSHiRAConfig, "microtune.methods.peers.tuners:PeftSHiRA"),
    "peft-supertuning": (PeftSuperTuningConfig, "microtune.methods.peers.tuners:PeftSuperTuning"),
}
for _name, (_config, _target) in _BUILTIN.items():
    register_method(_name, _config, _target)
del _name, _config, _target


def __getattr__(name: str) -> Any:
    # `from microtune.methods import Method` keeps working without importing torch up front.
    if name == "Method":
        return importlib.import_module("microtune.methods.base").Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MethodConfig",
    "build_method",
    "method_class",
    "method_config",
    "method_names",
    "register_method",
    "unregister_method",
]
