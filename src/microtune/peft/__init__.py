"""microtune's methods inside peft, transformers' Trainer and TRL (needs the `peft` extra).

Importing this package registers SLaSh, JR-WARP, PaFi and HiWi with peft under the peft types
"MICROTUNE_SLASH", "MICROTUNE_JRWARP", "MICROTUNE_PAFI" and "MICROTUNE_HIWI" (`registry`), so
`get_peft_model(model, SlashConfig(...))`, `PeftModel.from_pretrained` and TRL's
`SFTTrainer(peft_config=...)` take them. The configs are in `configs`, the tuner in `tuner`;
`to_artifact` (`artifact`) turns a saved peft folder into a microtune artifact. A registry, like
`microtune.methods`: the one folder `__init__` that does more than hold its docstring.
"""

from __future__ import annotations

from microtune.peft.artifact import to_artifact
from microtune.peft.configs import HiWiConfig, JRWarpConfig, PaFiConfig, SlashConfig
from microtune.peft.registry import SUPPORTED_PEFT, register

register()

__all__ = [
    "SUPPORTED_PEFT",
    "HiWiConfig",
    "JRWarpConfig",
    "PaFiConfig",
    "SlashConfig",
    "to_artifact",
]
