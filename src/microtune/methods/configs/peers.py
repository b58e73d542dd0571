"""The `peft` peers' options and stored state (the layers: `microtune.methods.peers`).

Importing this needs neither torch nor peft: a peer's config is checked (and offered on the
command line) before peft is asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

from microtune.common.records import Record, Sha256
from microtune.errors import MicrotuneError
from microtune.methods.configs.base import MethodConfig


def positive_sizes(peer: str, **sizes: int) -> None:
    """One-line error for a size option below 1 (ranks, vector lengths)."""
    for option, value in sizes.items():
        if value < 1:
            raise MicrotuneError(f"{peer}: {option} must be a positive integer, got {value}")


@dataclass
class PeerConfig(MethodConfig):
    """Options every peer has."""

    target_modules: str = field(
        default="",
        metadata={
            "help": (
                "comma-separated layer names; a layer matches when its dotted path equals a "
                'name or ends with "." + name. Empty: the peer\'s default (attention query and '
                "value; for (IA)³ key, value and the FFN's second linear)."
            )
        },
    )
    dropout: bool = field(
        default=True, metadata={"help": "keep the backbone's dropout while training."}
    )


@dataclass
class PeftLoRAConfig(PeerConfig):
    """peft's LoRA (Hu et al., 2022), peft's defaults."""

    rank: int = field(
        default=8,
        metadata={
            "help": (
                "rank r of the update B A. On MiniLM (query, value of 6 blocks) r = 8 trains "
                "73,728 numbers; r = 1 trains 9,216."
            )
        },
    )
    alpha: float = field(default=8.0, metadata={"help": "the update is scaled by alpha / rank."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the LoRA branch's input."}
    )

    def __post_init__(self) -> None:
        positive_sizes("peft-lora", rank=self.rank)
        if not self.alpha > 0:
            raise MicrotuneError(f"peft-lora: alpha must be positive, got {self.alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise MicrotuneError(
                f"peft-lora: lora_dropout must be in [0, 1), got {self.lora_dropout}"
            )


@dataclass
class PeftVeRAConfig(PeerConfig):
    """peft's VeRA (Kopiczko et al., 2024): frozen shared random A, B; trains per-layer scaling
    vectors d (rank) and b (output width)."""

    rank: int = field(
        default=256,
        metadata={
            "help": (
                "width r of the shared random projections (peft's default 256). Trains r + out "
                "numbers per target: 7,680 on MiniLM at 256 (within 10K)."
            )
        },
    )
    d_initial: float = field(
        default=0.1, metadata={"help": "initial value of the d vectors (b starts at zero)."}
    )
    projection_seed: int = field(
        default=0,
        metadata={
            "help": (
                "seed of the shared random projections (peft's `projection_prng_key`); recorded "
                "in the artifact, which regenerates them instead of storing them."
            )
        },
    )

    def __post_init__(self) -> None:
        positive_sizes("peft-vera", rank=self.rank)


@dataclass
class PeftIA3Config(PeerConfig):
    """peft's (IA)³ (Liu et al., 2022): learned vectors rescale activations. Its default targets
    are attention key, value and the FFN's second linear: 13,824 numbers on MiniLM ("key,value"
    alone trains 4,608)."""

    feedforward_modules: str = field(
        default="",
        metadata={
            "help": (
                "which targets are rescaled at their input rather than their output "
                "(comma-separated, as target_modules). Empty: the FFN's second linear (the "
                "paper's rescaled inner activation). Must be among the targets."
            )
        },
    )


@dataclass
class PeftUniLoRAConfig(PeerConfig):
    """peft's Uni-LoRA (Li et al., 2025): every LoRA entry reads one shared trainable vector
    theta_d through a fixed, seeded index map."""

    rank: int = field(
        default=4, metadata={"help": "rank r of the reconstructed LoRA update (peft's default 4)."}
    )
    theta_d_length: int = field(
        default=256,
        metadata={
            "help": (
                "length of the one trainable vector: all that trains (peft's default 256; 8,192 "
                "is the 10K-class preset on MiniLM)."
            )
        },
    )
    projection_seed: int = field(
        default=42,
        metadata={"help": "seed of the index map (peft's `proj_seed`); regenerated, not stored."},
    )

    def __post_init__(self) -> None:
        positive_sizes("peft-unilora", rank=self.rank, theta_d_length=self.theta_d_length)


@dataclass
class PeftTinyLoRAConfig(PeerConfig):
    """peft's TinyLoRA (Morris et al., 2026): frozen rank-r SVD factors of each weight, and
    a trainable u-vector per group read through fixed random (u, r, r) tensors."""

    rank: int = field(
        default=2, metadata={"help": "SVD rank r (peft's and the paper's default 2)."}
    )
    u: int = field(
        default=64,
        metadata={
            "help": (
                "trainable numbers per group (peft's default 64: 768 on MiniLM; 768 gives 9,216)."
            )
        },
    )
    weight_tying: float = field(
        default=0.0,
        metadata={
            "help": (
                "share of targets that share one vector: 0 (each its own) to 1 (one vector for "
                "the model)."
            )
        },
    )
    projection_seed: int = field(
        default=42, metadata={"help": "seed of the random tensors P; regenerated, not stored."}
    )

    def __post_init__(self) -> None:
        positive_sizes("peft-tinylora", rank=self.rank, u=self.u)
        if not 0 <= self.weight_tying <= 1:
            raise MicrotuneError(
                f"peft-tinylora: weight_tying must be in [0, 1], got {self.weight_tying}"
            )


@dataclass
class PeftSHiRAConfig(PeerConfig):
    """peft's SHiRA (Bhardwaj et al., 2024): trains a random sparse set of weight entries,
    r (in + out) per target (as many as a rank-r LoRA)."""

    rank: int = field(
        default=32,
        metadata={
            "help": (
                "r: each target trains r (in + out) entries (peft's default 32: 294,912 on "
                "MiniLM; 1 trains 9,216)."
            )
        },
    )
    mask_seed: int = field(
        default=42,
        metadata={
            "help": "seed of the random mask (peft's `random_seed`); regenerated, not stored."
        },
    )

    def __post_init__(self) -> None:
        positive_sizes("peft-shira", rank=self.rank)


@dataclass
class PeftSuperTuningConfig(PeerConfig):
    """peft's Super-Tuning: trains the largest- (or smallest-) magnitude entries of each target
    weight, as deltas starting at zero (peft's "Super" mode; the LoRA hybrid is not offered)."""

    sparsity: float = field(
        default=0.99,
        metadata={
            "help": (
                "share of each target's entries that stay frozen (peft's default 0.99: 17,688 "
                "trained on MiniLM; 0.995 trains 8,844)."
            )
        },
    )
    select_top: bool = field(
        default=True,
        metadata={
            "help": (
                "train the largest-magnitude entries (the paper's default); False: the "
                "smallest, as PaFi does."
            )
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise MicrotuneError(
                f"peft-supertuning: sparsity must be in [0, 1), got {self.sparsity}"
            )


class PeerState(Record):
    """A `peft` peer's frozen state (projections, indices), regenerated on load, not stored."""

    frozen_fingerprint: Sha256
