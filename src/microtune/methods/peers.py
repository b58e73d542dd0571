"""The `peft` library's tuners as microtune methods: the peers of issue 10's comparison.

Each peer is peft's own implementation, attached to the backbone the way `get_peft_model`
does it (peft's tuner class built on the backbone, which swaps the target layers for peft's
wrapper layers in place), so it trains through microtune's data, loop, read-out, head,
artifact and merge, and only the method differs from ours:

- `peft-lora` (LoRA), `peft-vera` (VeRA), `peft-ia3` ((IA)³), `peft-unilora` (Uni-LoRA),
  `peft-tinylora` (TinyLoRA), `peft-shira` (SHiRA) and `peft-supertuning` (Super-Tuning, the
  closest relative of PaFi).
- Targets: peft's own defaults for BERT-like models, read through our `ArchSpec` so they work
  on every family: attention query and value for all but (IA)³, which rescales keys, values
  and the FFN's inner activation (the input of its second linear) as in its paper. Targets are
  passed to peft as full layer paths, so a suffix such as BERT's "output.dense" cannot also
  catch "attention.output.dense" (which peft's own IA3 default for BERT does).
- Trainable: exactly peft's adapter tensors, kept in float32 whatever the base dtype (peft's
  `autocast_adapter_dtype`); they live in the backbone, so the artifact names them
  `backbone.<layer>.<peft name>`. Their initial values come from the global torch RNG, which
  `api.train` seeds with --seed before attaching, so the same --seed gives the same start.
- Stored: only the trainable tensors. What peft draws or computes besides them (VeRA's shared
  random A and B, Uni-LoRA's index map and scales, TinyLoRA's SVD factors and random P, SHiRA's
  random mask, Super-Tuning's top-magnitude support) is frozen, regenerated on attach from the
  base weights and the seeds in the method options (`projection_seed`, `mask_seed`), and not
  stored: peft's `save_projection` / `save_precomputed_indices` are off. `microtune.json`
  records a SHA-256 over that frozen state (`frozen_fingerprint`), and loading refuses an
  artifact whose regenerated state differs (another base model, or another peft version or
  device whose SVD, sort or random stream differs).
- Merge: peft's `merge_and_unload` folds every adapter into its weight and puts the original
  layers back, so the merged backbone is the stock architecture. All seven peers merge.

peft is an optional dependency: building a peer without it fails with one line naming
`pip install 'microtune[peft]'`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from microtune.arch import ArchSpec, is_conv1d
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, MethodConfig, copy_matching
from microtune.methods.lora import find_targets

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


def positive_sizes(peer: str, **sizes: int) -> None:
    """One-line error for a size option below 1 (ranks, vector lengths)."""
    for option, value in sizes.items():
        if value < 1:
            raise MicrotuneError(f"{peer}: {option} must be a positive integer, got {value}")


@dataclass
class PeerConfig(MethodConfig):
    """Options every peer has.

    Attributes:
        target_modules: comma-separated layer names; a layer matches when its dotted path equals
            a name or ends with "." + name. Empty: the peer's default (attention query and
            value; for (IA)³ key, value and the FFN's second linear).
        dropout: keep the backbone's dropout while training.
    """

    target_modules: str = ""
    dropout: bool = True


class PeftPeer(Method):
    """A peft tuner attached to the backbone; subclasses name the peft config and its options."""

    peft_config_class: ClassVar[str]  # e.g. "VeraConfig"
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
        from peft.tuners.tuners_utils import BaseTunerLayer

        frozen = {}
        for path, module in self._backbone.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for attribute in module.other_param_names:
                holder = getattr(module, attribute, None)
                # dicts, BufferDicts and ModuleDicts keyed by adapter name; scalars are not state
                has_adapter = hasattr(holder, "keys") and ADAPTER in holder
                value = holder[ADAPTER] if has_adapter else None
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    frozen[f"{path}.{attribute}"] = value
        return frozen

    def frozen_fingerprint(self) -> str | None:
        """SHA-256 over the frozen state's names, dtypes, shapes and bytes; None if empty."""
        frozen = self.frozen_state()
        if not frozen:
            return None
        digest = hashlib.sha256()
        for name, tensor in sorted(frozen.items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + digest.hexdigest()

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


# -- the seven peers ----------------------------------------------------------------------


@dataclass
class PeftLoRAConfig(PeerConfig):
    """peft's LoRA (Hu et al., 2022), peft's defaults.

    Attributes:
        rank: rank r of the update B A. On MiniLM (query, value of 6 blocks) r = 8 trains
            73,728 numbers; r = 1 trains 9,216.
        alpha: the update is scaled by alpha / rank.
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    rank: int = 8
    alpha: float = 8.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        positive_sizes("peft-lora", rank=self.rank)
        if not self.alpha > 0:
            raise MicrotuneError(f"peft-lora: alpha must be positive, got {self.alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise MicrotuneError(
                f"peft-lora: lora_dropout must be in [0, 1), got {self.lora_dropout}"
            )


class PeftLoRA(PeftPeer):
    name = "peft-lora"
    config_class = PeftLoRAConfig
    peft_config_class = "LoraConfig"
    default_learning_rate = 5e-4  # the LoRA paper's RoBERTa-base GLUE rate (SST-2, RTE)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {"r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.lora_dropout}


@dataclass
class PeftVeRAConfig(PeerConfig):
    """peft's VeRA (Kopiczko et al., 2024): frozen shared random A, B; trains per-layer scaling
    vectors d (rank) and b (output width).

    Attributes:
        rank: width r of the shared random projections (peft's default 256). Trains r + out
            numbers per target: 7,680 on MiniLM at 256 (within 10K).
        d_initial: initial value of the d vectors (b starts at zero).
        projection_seed: seed of the shared random projections (peft's `projection_prng_key`);
            recorded in the artifact, which regenerates them instead of storing them.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    rank: int = 256
    d_initial: float = 0.1
    projection_seed: int = 0

    def __post_init__(self) -> None:
        positive_sizes("peft-vera", rank=self.rank)


class PeftVeRA(PeftPeer):
    name = "peft-vera"
    config_class = PeftVeRAConfig
    peft_config_class = "VeraConfig"
    default_learning_rate = 4e-3  # the VeRA paper's RoBERTa-base rate (SST-2, MRPC)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "d_initial": c.d_initial,
            "projection_prng_key": c.projection_seed,
            "save_projection": False,
        }


@dataclass
class PeftIA3Config(PeerConfig):
    """peft's (IA)³ (Liu et al., 2022): learned vectors rescale activations.

    Attributes:
        feedforward_modules: which targets are rescaled at their input rather than their output
            (comma-separated, as target_modules). Empty: the FFN's second linear (the paper's
            rescaled inner activation). Must be among the targets.
        target_modules: layers to adapt (default: attention key, value and the FFN's second
            linear: 13,824 numbers on MiniLM; "key,value" alone trains 4,608).
        dropout: keep the backbone's dropout while training.
    """

    feedforward_modules: str = ""


class PeftIA3(PeftPeer):
    name = "peft-ia3"
    config_class = PeftIA3Config
    peft_config_class = "IA3Config"
    default_learning_rate = 3e-3  # the (IA)³ paper's (T-Few) rate

    def default_targets(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        _, key, value = arch.attention
        return block_paths(backbone, arch, [key, value, arch.ffn_out])

    def peft_options(self, backbone, arch, targets) -> dict:
        patterns = [p.strip() for p in self.config.feedforward_modules.split(",") if p.strip()]
        if patterns:
            feedforward = resolve_targets(self.name, backbone, ",".join(patterns), [])
        else:
            ffn = set(block_paths(backbone, arch, [arch.ffn_out]))
            feedforward = [t for t in targets if t in ffn]
        outside = sorted(set(feedforward) - set(targets))
        if outside:
            raise MicrotuneError(
                f"peft-ia3: feedforward module {outside[0]} is not among the targets; add it "
                "to --target-modules"
            )
        return {"feedforward_modules": feedforward}


@dataclass
class PeftUniLoRAConfig(PeerConfig):
    """peft's Uni-LoRA (Li et al., 2025): every LoRA entry reads one shared trainable vector
    theta_d through a fixed, seeded index map.

    Attributes:
        rank: rank r of the reconstructed LoRA update (peft's default 4).
        theta_d_length: length of the one trainable vector: all that trains (peft's default
            256; 8,192 is the 10K-class preset on MiniLM).
        projection_seed: seed of the index map (peft's `proj_seed`); regenerated, not stored.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    rank: int = 4
    theta_d_length: int = 256
    projection_seed: int = 42

    def __post_init__(self) -> None:
        positive_sizes("peft-unilora", rank=self.rank, theta_d_length=self.theta_d_length)


class PeftUniLoRA(PeftPeer):
    name = "peft-unilora"
    config_class = PeftUniLoRAConfig
    peft_config_class = "UniLoraConfig"
    default_learning_rate = 2e-3  # peft's method-comparison Uni-LoRA run (r4, lr 0.002)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "theta_d_length": c.theta_d_length,
            "proj_seed": c.projection_seed,
            "save_indices": False,
        }


@dataclass
class PeftTinyLoRAConfig(PeerConfig):
    """peft's TinyLoRA (Morris et al., 2026): frozen rank-r SVD factors of each weight, and
    a trainable u-vector per group read through fixed random (u, r, r) tensors.

    Attributes:
        rank: SVD rank r (peft's and the paper's default 2).
        u: trainable numbers per group (peft's default 64: 768 on MiniLM; 768 gives 9,216).
        weight_tying: share of targets that share one vector: 0 (each its own) to 1 (one
            vector for the model).
        projection_seed: seed of the random tensors P; regenerated, not stored.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    rank: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42

    def __post_init__(self) -> None:
        positive_sizes("peft-tinylora", rank=self.rank, u=self.u)
        if not 0 <= self.weight_tying <= 1:
            raise MicrotuneError(
                f"peft-tinylora: weight_tying must be in [0, 1], got {self.weight_tying}"
            )


class PeftTinyLoRA(PeftPeer):
    name = "peft-tinylora"
    config_class = PeftTinyLoRAConfig
    peft_config_class = "TinyLoraConfig"
    default_learning_rate = 1e-3  # peft's method-comparison TinyLoRA run (lr 1e-3)

    def peft_options(self, backbone, arch, targets) -> dict:
        c = self.config
        return {
            "r": c.rank,
            "u": c.u,
            "weight_tying": c.weight_tying,
            "projection_seed": c.projection_seed,
            "save_projection": False,
        }


@dataclass
class PeftSHiRAConfig(PeerConfig):
    """peft's SHiRA (Bhardwaj et al., 2024): trains a random sparse set of weight entries,
    r (in + out) per target (as many as a rank-r LoRA).

    Attributes:
        rank: r: each target trains r (in + out) entries (peft's default 32: 294,912 on
            MiniLM; 1 trains 9,216).
        mask_seed: seed of the random mask (peft's `random_seed`); regenerated, not stored.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    rank: int = 32
    mask_seed: int = 42

    def __post_init__(self) -> None:
        positive_sizes("peft-shira", rank=self.rank)


class PeftSHiRA(PeftPeer):
    name = "peft-shira"
    config_class = PeftSHiRAConfig
    peft_config_class = "ShiraConfig"
    supports_conv1d = False
    default_learning_rate = 3e-4  # peft's method-comparison SHiRA run (lr 0.0003)

    def peft_options(self, backbone, arch, targets) -> dict:
        return {"r": self.config.rank, "random_seed": self.config.mask_seed}

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        super().attach(backbone, arch)
        # SHiRA's update is a sparse COO tensor; torch warns on each run that its invariant
        # checks are "implicitly" off. Saying so explicitly changes nothing else (off is the
        # default) and keeps the warning out of every training log.
        torch.sparse.check_sparse_tensor_invariants.disable()


@dataclass
class PeftSuperTuningConfig(PeerConfig):
    """peft's Super-Tuning: trains the largest- (or smallest-) magnitude entries of each target
    weight, as deltas starting at zero (peft's "Super" mode; the LoRA hybrid is not offered).

    Attributes:
        sparsity: share of each target's entries that stay frozen (peft's default 0.99: 17,688
            trained on MiniLM; 0.995 trains 8,844).
        select_top: train the largest-magnitude entries (the paper's default); False: the
            smallest, as PaFi does.
        target_modules: layers to adapt (default: attention query and value).
        dropout: keep the backbone's dropout while training.
    """

    sparsity: float = 0.99
    select_top: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise MicrotuneError(
                f"peft-supertuning: sparsity must be in [0, 1), got {self.sparsity}"
            )


class PeftSuperTuning(PeftPeer):
    name = "peft-supertuning"
    config_class = PeftSuperTuningConfig
    peft_config_class = "SupertuningConfig"
    supports_conv1d = False
    # PaFi's (its closest relative, chosen on an SST-2 slice); peft's suite runs it at its
    # default 1e-4 on Llama-3.2-3B, which is too small for a 22M encoder.
    default_learning_rate = 1e-3

    def peft_options(self, backbone, arch, targets) -> dict:
        return {
            "sparsity": self.config.sparsity,
            "select_top": self.config.select_top,
            "save_precomputed_indices": False,
        }


PEERS: tuple[type[PeftPeer], ...] = (
    PeftLoRA,
    PeftVeRA,
    PeftIA3,
    PeftUniLoRA,
    PeftTinyLoRA,
    PeftSHiRA,
    PeftSuperTuning,
)
