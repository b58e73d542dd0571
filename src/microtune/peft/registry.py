"""Register microtune's tuners with peft, guarded against a peft that cannot hold them.

`peft.utils.register_peft_method` refuses any name outside its closed `PeftType` enum, so the
entries go straight into the four registries of `peft.mapping`, plain dicts keyed by the peft
type. `PeftConfig.peft_type` accepts a plain string, and a saved `adapter_config.json` is looked
up by it on load, so "MICROTUNE_SLASH" works wherever "LORA" does. Those dicts are peft's
internals: a peft without them, or with an entry under one of our names, is refused in one line
that names the range we support.
"""

from __future__ import annotations

import peft
import peft.mapping

from microtune.errors import MicrotuneError
from microtune.peft.configs import CONFIGS, peft_type_of
from microtune.peft.tuner import tuner_class

SUPPORTED_PEFT = ">=0.21,<0.22"
_REGISTRIES = (
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
)


def _unsupported(problem: str) -> MicrotuneError:
    return MicrotuneError(
        f"microtune.peft: peft {getattr(peft, '__version__', '?')} {problem}; install a "
        f"supported peft: pip install 'peft{SUPPORTED_PEFT}'"
    )


def registries() -> dict[str, dict]:
    """peft's four registries by name; a one-line error if this peft lacks any of them."""
    found = {name: getattr(peft.mapping, name, None) for name in _REGISTRIES}
    missing = [name for name, value in found.items() if not isinstance(value, dict)]
    if missing:
        raise _unsupported(f"has no registry peft.mapping.{missing[0]}")
    return found


def register() -> None:
    """Add SLaSh, JR-WARP, PaFi and HiWi to peft's registries; refuses to overwrite an entry.

    Run once when `microtune.peft` is imported (a second import finds our own entries)."""
    maps = registries()
    for config_class in CONFIGS:
        key = peft_type_of(config_class.method_name)
        existing = maps["PEFT_TYPE_TO_CONFIG_MAPPING"].get(key)
        if existing is config_class:
            continue
        if any(key in registry for registry in maps.values()):
            raise _unsupported(f"already has a method registered as '{key}'")
        tuner = tuner_class(config_class)
        maps["PEFT_TYPE_TO_CONFIG_MAPPING"][key] = config_class
        maps["PEFT_TYPE_TO_TUNER_MAPPING"][key] = tuner
        maps["PEFT_TYPE_TO_PREFIX_MAPPING"][key] = tuner.prefix
        # Not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING: a method owns its backbone, so it does not
        # mix with other adapters (peft's PeftMixedModel then refuses it by itself).
