"""LoRA, SLaSh, JR-WARP, PaFi and HiWi artifacts in peft's format (`PeftModel.from_pretrained`).

microtune's LoRA is peft's LoRA (same A (r, in) and B (out, r), same alpha / r scale, see
`bench/peft_lora.py`), so its export is a renaming; SLaSh, JR-WARP, PaFi and HiWi are peft
methods through `microtune.peft` (its configs, and the tensor names of `peft.artifact`).
`export_peft` writes into one folder:

- `adapter_config.json`: peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules: the
  full paths of the layers LoRA was attached to, fan_in_fan_out for GPT-2's Conv1D, whose
  weight is (in, out)), or the method's `microtune.peft` config (its options and the base's
  fingerprint); task type FEATURE_EXTRACTION, so it loads on `AutoModel`;
- `adapter_model.safetensors`: LoRA's A and B under peft's names,
  `base_model.model.<layer path>.lora_A.weight` and `....lora_B.weight`, or the method's
  tensors as `microtune.peft` saves them (`base_model.microtune_slash.z`; a served HiWi's
  biases as the rank-one adapters that give them, `HiWi.adapter_state`);
- `head.safetensors` and `microtune_export.json`, exactly as the merged "backbone+head" export,
  with the format "peft+head"; and the tokenizer.

Loading needs peft (`pip install 'microtune[peft]'`) and, for our four methods, `import
microtune.peft` (it registers them); `microtune.peft.to_artifact` turns the folder back into
an artifact.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from microtune.artifacts import folders
from microtune.artifacts.store import load_artifact, read_artifact_config
from microtune.backbone.arch import is_conv1d
from microtune.backbone.load import load_backbone
from microtune.common.files import write_json, write_tensors
from microtune.errors import MicrotuneError
from microtune.export.merged import (
    PEFT_FORMAT,
    check_logit_diff,
    check_rows,
    load_exported,
    logit_difference,
    write_export_record,
    write_head,
)
from microtune.methods.hiwi import HiWi
from microtune.methods.lora import LoRA
from microtune.model import TaskModel
from microtune.peft.artifact import peft_tensors as method_peft_tensors
from microtune.peft.configs import CONFIGS, config_class_of
from microtune.tasks.data import batches
from microtune.tasks.inference import join_outputs, predict

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# peft's PeftModel wraps the base model as base_model (LoraModel) . model (the backbone).
PEFT_PREFIX = "base_model.model."
# The methods this export writes: LoRA, and the four of `microtune.peft`.
PEFT_METHODS = ("lora", *(config.method_name for config in CONFIGS))


def peft_tensors(method: LoRA) -> dict[str, torch.Tensor]:
    """A and B of every target, named as peft's `save_pretrained` names them."""
    tensors = {}
    for path, factors in zip(method.target_paths(), method.factors.values(), strict=True):
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = factors.A
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = factors.B
    return tensors


def peft_config(method: LoRA, backbone: torch.nn.Module, base_model: str) -> dict[str, Any]:
    """peft's `adapter_config.json` for this LoRA (fields a LoraConfig reads; the rest default)."""
    paths = method.target_paths()
    alpha = method.config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": method.config.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": method.config.lora_dropout,
        "target_modules": paths,
        # One flag for the model; peft corrects it per layer, so set it when any is a Conv1D.
        "fan_in_fan_out": any(is_conv1d(backbone.get_submodule(p)) for p in paths),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def load_peft_artifact(artifact_dir: str | os.PathLike, model: str | None = None):
    """`load_artifact` for a method this export writes (`PEFT_METHODS`); any other is refused
    before loading."""
    method_name = read_artifact_config(artifact_dir)["method"]
    if method_name not in PEFT_METHODS:
        raise MicrotuneError(
            f"--format peft writes {', '.join(PEFT_METHODS)} artifacts, but {artifact_dir} "
            f"holds '{method_name}'; export it with --format merged"
        )
    return load_artifact(artifact_dir, model)


def microtune_peft_files(
    task_model: TaskModel, config: dict[str, Any], base: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config.json) of a SLaSh, JR-WARP, PaFi or HiWi task model, as
    `microtune.peft` saves them; `base` (default: the artifact's) gives a served HiWi its P."""
    method = task_model.method
    if isinstance(method, HiWi):
        dtype = config["base_model"].get("dtype", "float32")
        state = method.adapter_state(load_backbone(base or config["base_model"]["name"], dtype)[0])
    else:
        trained = task_model.trainable_state()
        state = {n.removeprefix("method."): t for n, t in trained.items() if n[:7] == "method."}
    settings = config_class_of(method.name)(
        task_type="FEATURE_EXTRACTION",
        inference_mode=True,
        base_fingerprint=config["base_model"]["fingerprint"],
        **dataclasses.asdict(method.config),
    )
    return method_peft_tensors(method.name, state), settings.to_dict()


def write_peft(
    task_model: TaskModel,
    tokenizer,
    config: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: list[tuple[str, str | os.PathLike]] | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Write a loaded task model (`PEFT_METHODS`) in peft's format with the head beside it (the
    model is left as it was); returns the output folder, format, method and adapter numbers.

    The folder is built beside `output_dir` and moved into place once complete, with the
    refusals of `export.export_merged` (`folders.model_folder`)."""
    method = task_model.method
    if isinstance(method, LoRA):
        tensors = peft_tensors(method)
        settings = peft_config(method, task_model.backbone, config["base_model"]["name"])
    else:
        tensors, settings = microtune_peft_files(task_model, config, base)
    protected = [
        *folders.export_protected(config, model=getattr(task_model.backbone, "name_or_path", None)),
        *(protected or []),
    ]
    with folders.model_folder(output_dir, overwrite=overwrite, protected=protected) as staging:
        write_tensors(staging / ADAPTER_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        # Without a base named here, transformers' pipeline() and Auto classes refuse the folder
        # (KeyError) instead of loading the base with a random head under the adapter; peft
        # loads it over the base passed in (`load_peft`, microtune_export.json names it).
        settings.pop("base_model_name_or_path", None)
        write_json(staging / ADAPTER_CONFIG_FILE, settings)
        write_head(task_model, staging)
        tokenizer.save_pretrained(staging)
        write_export_record(task_model, config, staging, PEFT_FORMAT)
    report = {"output": str(output_dir), "format": PEFT_FORMAT, "method": method.name}
    if isinstance(method, LoRA):
        report["targets"] = len(method.target_paths())
    return report | {"adapter_parameters": sum(t.numel() for t in tensors.values())}


def export_peft(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an artifact of `PEFT_METHODS` in peft's format with the head beside it; refuses
    other methods (and output folders as `write_peft` does)."""
    protected = check_peft_output(artifact_dir, output_dir, model, overwrite)
    return write_peft(
        *load_peft_artifact(artifact_dir, model),
        output_dir,
        overwrite=overwrite,
        protected=protected,
        base=model,
    )


def check_peft_output(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | None,
    overwrite: bool,
) -> list[tuple[str, str]]:
    """Refuse the output folder before anything is loaded; returns the protected folders."""
    protected = folders.export_protected(read_artifact_config(artifact_dir), artifact_dir, model)
    folders.check_model_folder(output_dir, overwrite=overwrite, protected=protected)
    return protected


def export_peft_and_check(
    artifact_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    examples: int = 256,
    overwrite: bool = False,
    data_file: str | None = None,
) -> dict[str, Any]:
    """`export_peft`, then load the folder with peft and compare its logits (through the head)
    with the unmerged artifact's on dev examples (of `data_file` for tasks on the user's own
    files): max |logit difference|."""
    if examples < 1:
        raise MicrotuneError(f"--check-examples must be at least 1, got {examples}")
    protected = check_peft_output(artifact_dir, output_dir, model, overwrite)
    unmerged, tokenizer, config = load_peft_artifact(artifact_dir, model)
    rows = check_rows(tokenizer, config, data_dir, examples, data_file)  # before writing anything
    expected = predict(unmerged, rows, tokenizer.pad_token_id)
    report = write_peft(
        unmerged,
        tokenizer,
        config,
        output_dir,
        overwrite=overwrite,
        protected=protected,
        base=model,
    )
    peft_logits, _ = load_exported(output_dir, base_model=model)
    with torch.no_grad():
        found = join_outputs(
            [
                peft_logits(**inputs).float()
                for inputs, _ in batches(rows, [0] * len(rows), 64, tokenizer.pad_token_id)
            ],
            rows,
        )
    diff, largest = logit_difference(found, expected)
    check_logit_diff(diff, largest, config["base_model"].get("dtype", "float32"), output_dir)
    report.update(examples=len(rows), max_abs_logit_diff=diff)
    return report
