"""PaFi's options and stored state (the layers: `microtune.methods.pafi`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from microtune.common.records import Record, Sha256
from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig

MASKS = ("smallest", "largest", "random")


@dataclass
class PaFiConfig(MethodConfig):
    """PaFi options."""

    k: float = field(
        default=0.005,
        metadata={
            "help": (
                "how many weights train: a count if >= 1, else a fraction of the candidate weights."
            )
        },
    )
    mask: str = field(
        default="smallest",
        metadata={
            "help": '"smallest" |w| (PaFi), or the ablations "largest" |w| and "random" (seeded).'
        },
    )
    mask_seed: int = field(default=0, metadata={"help": 'seed of the "random" mask.'})
    candidates: str = field(
        default="",
        metadata={
            "help": (
                "comma-separated parameter or layer names to select from; a name matches a "
                'parameter whose dotted name equals it or ends with "." + name, or the weight '
                'of a layer whose path does (e.g. "query,value" or "word_embeddings"). Empty: '
                "the architecture's block weight matrices (attention q, k, v, output and the "
                "FFN linears of every block; never embeddings, norms, biases or the head)."
            )
        },
    )
    store_indices: bool = field(
        default=False,
        metadata={
            "help": (
                "store the mask's positions in the artifact (int64, 8 bytes per value) instead "
                "of recomputing them from the base model at load time."
            )
        },
    )
    dropout: bool = field(default=True, metadata={"help": "keep backbone dropout while training."})

    def __post_init__(self) -> None:
        if not self.k > 0 or (self.k >= 1 and self.k != int(self.k)):
            raise MicrotuneError(
                f"pafi: k must be a whole count >= 1 or a fraction in (0, 1), got {self.k}"
            )
        if self.mask not in MASKS:
            raise MicrotuneError(f"pafi: mask '{self.mask}' unknown; use {MASKS}")

    def count(self, total: int) -> int:
        """k as a number of weights, out of `total` candidates."""
        k = int(self.k) if self.k >= 1 else round(self.k * total)
        if not 1 <= k <= total:
            raise MicrotuneError(
                f"pafi: k={self.k} selects {k} of {total} candidate weights; "
                "choose k between 1 and the number of candidates"
            )
        return k


class PaFiState(Record):
    """What PaFi records beside its tensors (`PaFi.stored_metadata`): the mask it trained."""

    mask_fingerprint: Sha256
    k: Annotated[int, Field(ge=1)]
    candidates: Annotated[int, Field(ge=1)]
