"""The method registry: one name, one module. Adding a method is one module and one line here."""

from __future__ import annotations

from typing import Any

from microtune.errors import MicrotuneError
from microtune.methods.base import Method, MethodConfig
from microtune.methods.slash import SLaSh, SLaShConfig

METHODS: dict[str, type[Method]] = {
    SLaSh.name: SLaSh,
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
    "Method",
    "MethodConfig",
    "SLaSh",
    "SLaShConfig",
    "build_method",
    "method_class",
]
