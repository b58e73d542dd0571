"""ONNX export: the merged task model (backbone, read-out and head) as one graph that
`onnxruntime` runs with no microtune installed, with dynamic batch and sequence axes and the
label names in the model's metadata; optionally int8 (dynamic quantisation of the weights).

import json, onnxruntime, numpy as np
from tokenizers import Tokenizer
session = onnxruntime.InferenceSession("runs/sst2-onnx/model.onnx")
labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
# feed the tokenizer's input_ids / attention_mask (/ token_type_ids) as int64: logits out

Sentence types (classification, regression, a decoder's last-token classification) output
logits (batch, num_labels); token classification (batch, sequence, num_labels). BERT-shaped
encoders (float32) go through torch's TorchScript exporter and onnxruntime's transformer
optimizer, which fuses their attention, embeddings and layer norms into its own ops; every
other model (and int8, which quantises the plain graph) through `torch.onnx.export(dynamo=True)`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtune.common.files import atomic_write
from microtune.errors import MicrotuneError
from microtune.tasks.probe import probe_batch

ONNX_FORMAT = "onnx"
ONNX_FILE = "model.onnx"
QUANTIZATIONS = ("int8",)
# The task types whose whole function (read-out and head included) fits in the graph.
ONNX_TASK_TYPES = ("classification", "regression", "token-classification")
# Above this many bytes of weights the graph keeps them in a side file (protobuf's 2 GB cap).
_INLINE_WEIGHTS_BYTES = 1_500_000_000
# Encoders whose attention onnxruntime's transformer optimizer fuses (model_type "bert").
_FUSABLE_ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def graph_inputs(task_model) -> list[str]:
    """The graph's inputs, named as the tokenizer names its outputs (feed them as they come)."""
    names = ["input_ids", "attention_mask"]
    return [*names, "token_type_ids"] if task_model.arch.token_type_ids else names


def check_onnx_exportable(task_model, quantize: str | None) -> None:
    """Refuse, in one line, a task type or quantisation the ONNX export does not cover."""
    name = task_model.task_type.name
    if name not in ONNX_TASK_TYPES:
        raise MicrotuneError(
            f"--format onnx covers {', '.join(ONNX_TASK_TYPES)} artifacts, not {name}; "
            "use --format merged"
        )
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MicrotuneError(f"--quantize {quantize} is unknown; use one of {QUANTIZATIONS}")


def write_onnx(
    task_model,
    folder: str | os.PathLike,
    metadata: dict[str, Any],
    quantize: str | None = None,
) -> None:
    """Write `model.onnx` (float32; int8 weights with `quantize="int8"`) of the merged task
    model into `folder`, with `metadata` (JSON-encoded values) in the model's metadata."""
    check_onnx_exportable(task_model, quantize)
    try:
        import onnxscript  # noqa: F401 (torch's dynamo exporter translates with it)
    except ImportError:
        raise MicrotuneError("--format onnx needs: pip install 'microtune[export]'") from None
    task_model.merge().float().eval()  # ONNX Runtime's CPU kernels are float32
    folder = Path(folder)
    weight_bytes = sum(p.numel() * 4 for p in task_model.parameters())
    float_path = folder / (ONNX_FILE if quantize is None else f".float32.{ONNX_FILE}")
    external = weight_bytes > _INLINE_WEIGHTS_BYTES
    with torch.no_grad(), _quiet_exporter():
        # quantize_dynamic cannot type the fused ops' outputs: int8 quantises the plain graph.
        if fusable_encoder(task_model) and not external and quantize is None:
            _export_fused(task_model, float_path)
        else:
            _export_dynamo(task_model, float_path, external)
    if quantize is None:
        _set_metadata(float_path, metadata)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = folder / ONNX_FILE
    # Per output channel: one scale per row of each weight keeps MiniLM's SST-2 labels where
    # one scale per tensor flips 7% of them (bench/onnx_speed.py).
    quantize_dynamic(str(float_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
    float_path.unlink()
    _set_metadata(int8_path, metadata)


def fusable_encoder(task_model) -> bool:
    """Whether onnxruntime's transformer optimizer fuses this backbone's attention (BERT-shaped
    encoders: one fused Attention op per layer, embeddings and layer norms fused too)."""
    config = task_model.backbone.config
    return config.model_type in _FUSABLE_ENCODERS and not config.is_decoder


def _export_dynamo(task_model, path: Path, external: bool) -> None:
    """torch's dynamo exporter (torch.export + onnxscript): every architecture."""
    names = graph_inputs(task_model)
    probe = probe_batch(task_model)
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    program = torch.onnx.export(
        task_model,
        tuple(probe[name] for name in names),
        input_names=names,
        output_names=["logits"],
        dynamic_shapes={name: axes for name in names},
        dynamo=True,
        verbose=False,
    )
    program.save(str(path), external_data=external)


def _export_fused(task_model, path: Path) -> None:
    """A BERT-shaped encoder through the TorchScript exporter with eager attention, the graph
    onnxruntime's optimizer recognises (dynamo's is not), then fused by it."""
    from onnxruntime.transformers.optimizer import optimize_model

    names = graph_inputs(task_model)
    probe = probe_batch(task_model)
    backbone = task_model.backbone
    attention = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")  # sdpa's mask code hides the attention pattern
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it fixes
            torch.onnx.export(
                task_model,
                tuple(probe[name] for name in names),
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names},
                opset_version=17,
                dynamo=False,
            )
    finally:
        backbone.set_attn_implementation(attention)
    config = backbone.config
    fused = optimize_model(
        str(path),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    atomic_write(path, lambda tmp: fused.save_model_to_file(str(tmp)))


@contextlib.contextmanager
def _quiet_exporter():
    """stdout is the CLI's JSON; the exporter's notes on its own internals (operators of
    torchvision it skips, axis names it renames) are not the user's."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(axis name|treespec|LeafSpec).*")
            yield
    finally:
        logger.setLevel(level)


def _set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Put `metadata` (values JSON-encoded, strings as they are) in the model's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    atomic_write(path, lambda tmp: onnx.save(model, tmp))


def load_onnx(folder: str | os.PathLike):
    """The export's `model.onnx` in an onnxruntime CPU session; returns a function
    inputs (torch tensors, as the tokenizer names them) -> logits (a torch tensor)."""
    try:
        import onnxruntime
    except ImportError:
        raise MicrotuneError(
            "an ONNX export runs in onnxruntime: pip install 'microtune[export]'"
        ) from None
    path = Path(folder) / ONNX_FILE
    if not path.is_file():
        raise MicrotuneError(f"{folder} has no {ONNX_FILE}; export it with --format onnx")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail) derive from it
        raise MicrotuneError(
            f"onnxruntime cannot load {path} ({str(error).strip().splitlines()[0][:200]}); "
            "export the artifact again with --format onnx"
        ) from None
    wanted = [node.name for node in session.get_inputs()]
    unknown = sorted(set(wanted) - {"input_ids", "attention_mask", "token_type_ids"})
    if unknown or "logits" not in [node.name for node in session.get_outputs()]:
        raise MicrotuneError(
            f"{path} is no microtune export's graph (it takes {', '.join(wanted)} and must take "
            "a tokenizer's inputs and give logits); export the artifact again with --format onnx"
        )

    def logits(**inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: np.asarray(inputs[name].cpu(), dtype=np.int64) for name in wanted}
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return logits, session


def onnx_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """The export's ONNX metadata (as stored: JSON-encoded values)."""
    import onnx

    model = onnx.load(str(Path(folder) / ONNX_FILE), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}
