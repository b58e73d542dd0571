"""A peft folder of a microtune method, as a microtune artifact (`to_artifact`).

The folder holds what `save_pretrained` wrote: `adapter_config.json` (a `SlashConfig` & co., with
the fingerprint of the base it was trained on) and `adapter_model.safetensors` (the method's
tensors as `base_model.microtune_<method>.<name>`, the head as `base_model.model.classifier.*`).
The converter loads the base as microtune loads it, refuses one whose weights differ from the
recorded fingerprint, rebuilds a `TaskModel` with the same method and a "pooler" read-out (what a
BERT-style `...ForSequenceClassification` feeds its `classifier`), copies the tensors in, and
writes the artifact with `artifacts.store.save_artifact`: the method then stores what it always
stores (HiWi its biases P', PaFi its values with the mask fingerprint), so `microtune.load` serves
it with the same logits. A folder that `microtune export --format peft` wrote (the adapter on
the bare backbone, task type FEATURE_EXTRACTION, with `head.safetensors` and
`microtune_export.json` beside it) converts too: its head, read-out, task and max length come
from the export, so microtune -> peft -> microtune gives the artifact back (`peft_tensors` names
the method's tensors as peft does, the inverse of `split_tensors`).

A causal-LM adapter (task type CAUSAL_LM, as TRL's `SFTTrainer` trains it) holds the method's
tensors alone: the head is the base's own frozen LM head. It converts to a `causal-lm` artifact
(prompt/response columns, the base loaded with `AutoModelForCausalLM`) that `microtune generate`
and `microtune serve` continue prompts with, giving the peft model's greedy tokens.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from safetensors.torch import load_file

from microtune.artifacts.folders import check_output
from microtune.artifacts.store import read_export_record, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import check_max_length, fingerprint, load_backbone
from microtune.common.files import EXPORT_FILE, HEAD_FILE
from microtune.common.manifest import check_export_files
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.base import copy_matching
from microtune.model import HeadConfig, TaskModel
from microtune.peft.configs import MicrotunePeftConfig
from microtune.peft.tuner import backbone_of
from microtune.tasks.examples import task_record
from microtune.tasks.spec import TASKS
from microtune.tasks.types import get_task_type

ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_PREFIX = "base_model.model.classifier."
CAUSAL_COLUMNS = ("prompt", "response")


def method_prefix(method_name: str) -> str:
    """Where peft saves a method's tensors: "base_model.microtune_slash." (`tuner`'s container)."""
    return f"base_model.microtune_{method_name}."


def peft_tensors(method_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The method's tensors ("z", "adapters.0-ffn_in.A") as peft's `save_pretrained` names them."""
    return {method_prefix(method_name) + name: tensor for name, tensor in state.items()}


def read_peft_folder(folder: Path) -> tuple[MicrotunePeftConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors; a one-line error for anything but ours."""
    if not (folder / "adapter_config.json").is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise MicrotuneError(
            f"{folder} is not a peft adapter folder (adapter_config.json and {ADAPTER_WEIGHTS}); "
            "save the PeftModel with save_pretrained"
        )
    config = PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, MicrotunePeftConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)  # "LORA", not PeftType.LORA
        raise MicrotuneError(
            f"{folder} holds a peft {kind} adapter, not a microtune method; only "
            "SlashConfig, JRWarpConfig, PaFiConfig and HiWiConfig adapters convert"
        )
    return config, load_file(folder / ADAPTER_WEIGHTS)


def split_tensors(
    config: MicrotunePeftConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(method tensors as `TaskModel` names them, "method.z"; head tensors, "head.linear.*")."""
    own = method_prefix(config.method_name)
    method, head = {}, {}
    for name, tensor in tensors.items():
        if name.startswith(own):
            method["method." + name.removeprefix(own)] = tensor
        elif name.startswith(HEAD_PREFIX):
            head["head.linear." + name.removeprefix(HEAD_PREFIX)] = tensor
        else:
            raise MicrotuneError(
                f"{name} in {ADAPTER_WEIGHTS} is neither the method's nor a `classifier` head's; "
                "to_artifact converts a BERT-style sequence classifier (a linear `classifier` "
                "on the pooler) or a causal LM (task_type='CAUSAL_LM', the method alone)"
            )
    return method, head


def exported_head(folder: Path, head: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The export record of a folder `microtune export --format peft` wrote (its head moved into
    `head`, as "head.linear.*"), else None; refuses a folder with no head at all."""
    if (folder / EXPORT_FILE).is_file() and (folder / HEAD_FILE).is_file():
        record = read_export_record(folder)
        check_export_files(folder, record)  # the head and adapter as the export wrote them
        head.update({"head.linear." + n: t for n, t in load_file(folder / HEAD_FILE).items()})
        return record
    if "head.linear.weight" not in head:
        raise MicrotuneError(
            f"{ADAPTER_WEIGHTS} holds no `classifier` head; train with task_type='SEQ_CLS' on "
            "a BERT-style AutoModelForSequenceClassification"
        )
    return None


def is_causal_lm(config: MicrotunePeftConfig) -> bool:
    """Whether the adapter was trained on a `...ForCausalLM` (task type CAUSAL_LM)."""
    return getattr(config.task_type, "value", config.task_type) == "CAUSAL_LM"


def load_checked_base(
    config: MicrotunePeftConfig,
    model: str | None,
    pooler: bool = True,
    auto_class: str = "AutoModel",
) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, fingerprint, name) of the base loaded with `auto_class`, once its body
    matches the recorded fingerprint (and has a pooler, when the head reads it). The returned
    fingerprint is the whole model's, as an artifact records it (a causal LM's LM head too)."""
    name = model or config.base_model_name_or_path
    if not name:
        raise MicrotuneError("the adapter names no base model; pass model= with its name or folder")
    backbone, tokenizer = load_backbone(name, "float32", auto_class)
    found = fingerprint(backbone_of(backbone))  # the body, as the tuner recorded it
    if config.base_fingerprint is None:
        raise MicrotuneError(
            "the adapter records no base fingerprint, so its base cannot be checked; save it "
            "again with this version of microtune.peft"
        )
    if found != config.base_fingerprint:
        raise MicrotuneError(
            f"base model mismatch: the adapter was trained on a base with "
            f"{config.base_fingerprint[:19]}… but '{name}' has {found[:19]}…; pass model= "
            "with the original base model"
        )
    if pooler and arch_for(backbone).pooler is None:
        raise MicrotuneError(
            f"{backbone.config.model_type} has no pooler; to_artifact converts BERT-style "
            "classifiers (a linear `classifier` on the pooler)"
        )
    whole = found if backbone_of(backbone) is backbone else fingerprint(backbone)
    return backbone, tokenizer, whole, name


def task_of(
    num_labels: int, label_names: list[str] | None, text_columns: tuple[str, ...]
) -> dict[str, Any]:
    """The artifact's task record: classification over `label_names`, or regression."""
    if num_labels == 1:
        return task_record(TASKS["regression"], text_columns)
    names = tuple(label_names or (f"LABEL_{i}" for i in range(num_labels)))
    if len(names) != num_labels:
        raise MicrotuneError(
            f"label_names has {len(names)} names but the head has {num_labels} outputs"
        )
    task = replace(TASKS["classification"], num_labels=num_labels, label_names=names)
    return task_record(task, text_columns)


def new_task(
    head: dict[str, torch.Tensor],
    label_names: list[str] | None,
    text_columns: tuple[str, ...] | None,
    causal: bool,
) -> dict[str, Any]:
    """The task record of an adapter that brings none: causal-lm (prompt/response columns) for
    a causal LM, else classification over the head's outputs (regression for one)."""
    if causal:
        return task_record(TASKS["causal-lm"], tuple(text_columns or CAUSAL_COLUMNS))
    num_labels = head["head.linear.weight"].shape[0]
    return task_of(num_labels, label_names, tuple(text_columns or ("text",)))


def filled_task_model(
    config: MicrotunePeftConfig,
    backbone: Any,
    tokenizer: Any,
    tensors: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    readout: str | None,
) -> TaskModel:
    """The `TaskModel` of the adapter's method with its (method, head) tensors copied in: the
    base's own LM head when `readout` is None (a causal LM), else a linear head on `readout`."""
    method_tensors, head_tensors = tensors
    method = build_method(config.method_name, config.method_options())
    if readout is None:
        causal = get_task_type("causal-lm")
        task_model = TaskModel(backbone, HeadConfig(1, "tokens"), method, task_type=causal)
    else:
        num_labels = head_tensors["head.linear.weight"].shape[0]
        head = HeadConfig(num_labels, readout=readout, bias="head.linear.bias" in head_tensors)
        task_model = TaskModel(backbone, head, method, mask_token_id=tokenizer.mask_token_id)
    trainable = task_model.trainable_state()
    copy_matching(head_tensors, {n: t for n, t in trainable.items() if n.startswith("head.")})
    copy_matching(method_tensors, {n: t for n, t in trainable.items() if n.startswith("method.")})
    return task_model.eval()


def to_artifact(
    peft_folder: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | None = None,
    label_names: list[str] | None = None,
    text_columns: tuple[str, ...] | None = None,
    max_length: int = 128,
) -> dict[str, Any]:
    """Write the peft folder of a microtune method as a microtune artifact in `output` (a new
    or empty folder); `model`: the base model when the adapter's `base_model_name_or_path` is
    not where it is now. A causal-LM adapter becomes a causal-lm artifact (`text_columns`
    default: prompt, response); a folder `microtune export --format peft` wrote brings its own
    task, read-out and max length (`label_names`, `text_columns` (default: text) and
    `max_length` are for the rest). Returns the artifact's size in bytes and its trained
    numbers."""
    config, tensors = read_peft_folder(Path(peft_folder))
    method_tensors, head_tensors = split_tensors(config, tensors)
    causal = is_causal_lm(config)
    record = None if causal else exported_head(Path(peft_folder), head_tensors)
    target = check_output(output, "output")
    if target.exists() and any(target.iterdir()):
        raise MicrotuneError(f"output {output} is not empty; name a new or empty folder")
    base_name = model or (record["base_model"]["name"] if record else None)
    auto_class = get_task_type("causal-lm").auto_class if causal else "AutoModel"
    pooler = record is None and not causal
    backbone, tokenizer, found, name = load_checked_base(config, base_name, pooler, auto_class)
    if record:
        task, max_length = record["task"], record["max_length"]
    else:
        task = new_task(head_tensors, label_names, text_columns, causal)
    check_max_length(backbone, max_length)
    readout = None if causal else (record["readout"] if record else "pooler")
    tensors_in = (method_tensors, head_tensors)
    task_model = filled_task_model(config, backbone, tokenizer, tensors_in, readout)
    target.mkdir(parents=True, exist_ok=True)
    size = save_artifact(
        target,
        task_model,
        method_name=config.method_name,
        base_model=name,
        base_fingerprint=found,
        task=task,
        max_length=max_length,
        tokenizer=tokenizer,
    )
    return {"output": str(target), "bytes": size, "parameters": task_model.count_trainable()}
