"""The method registry: one name, one module. Adding a method is one module and one line here."""

from __future__ import annotations

from typing import Any

from microtune.errors import MicrotuneError
from microtune.methods.adapter import Adapter, AdapterConfig
from microtune.methods.base import Method, MethodConfig
from microtune.methods.bitfit import BitFit, BitFitConfig
from microtune.methods.full import Full, FullConfig
from microtune.methods.hiwi import HiWi, HiWiConfig
from microtune.methods.jrwarp import JRWARP, JRWARPConfig
from microtune.methods.linear import LinearProbe, LinearProbeConfig
from microtune.methods.lora import LoRA, LoRAConfig
from microtune.methods.pafi import PaFi, PaFiConfig
from microtune.methods.peers import PEERS
from microtune.methods.slash import SLaSh, SLaShConfig
from microtune.methods.warp import WARP, WARPConfig

METHODS: dict[str, type[Method]] = {
    SLaSh.name: SLaSh,
    JRWARP.name: JRWARP,
    WARP.name: WARP,
    Full.name: Full,
    LinearProbe.name: LinearProbe,
    BitFit.name: BitFit,
    LoRA.name: LoRA,
    Adapter.name: Adapter,
    PaFi.name: PaFi,
    HiWi.name: HiWi,
    # peft's tuners (`peft-lora`, `peft-vera`, ...): need the optional peft dependency.
    **{peer.name: peer for peer in PEERS},
}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise MicrotuneError(
            f"method '{name}' is unknown; available: {', '.join(sorted(METHODS))}"
        ) from None


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from its name and config options (unknown options are an error)."""
    cls = method_class(name)
    return cls(cls.config_class.from_dict(options or {}))


__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "BitFit",
    "BitFitConfig",
    "Full",
    "FullConfig",
    "HiWi",
    "HiWiConfig",
    "JRWARP",
    "JRWARPConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "LoRA",
    "LoRAConfig",
    "Method",
    "MethodConfig",
    "PaFi",
    "PaFiConfig",
    "SLaSh",
    "SLaShConfig",
    "WARP",
    "WARPConfig",
    "build_method",
    "method_class",
]
