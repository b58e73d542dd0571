"""BitFit's options (the layers: `microtune.methods.bitfit`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.methods.configs.base import MethodConfig


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit options."""

    create_missing_biases: bool = field(
        default=False,
        metadata={
            "help": (
                "add a zero bias to every block linear that has none (Llama) and train it too; "
                "merging then sets the config's bias flags (e.g. mlp_bias). Off by default: "
                "BitFit trains the biases the model has."
            )
        },
    )
    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})
