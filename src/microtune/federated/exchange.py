"""What travels between the server and a client, per method, and the checks on what arrives.

Clients send what trains, under its `TaskModel` name (the head included):
- SLaSh / JR-WARP: z (and the head); BitFit: the bias tensors; full: every weight;
- PaFi: the k values, never their positions: every client recomputes the mask from the public
  base weights and the server sends the mask's fingerprint, which a client checks before it
  trains. With the method's `store_indices` the int64 positions travel up too (to measure what
  they cost); the server then compares them with its own and averages only the values;
- LoRA: A and B (averaging both is not averaging B·A); `lora_frozen_a` keeps every A at its
  seeded start, so only B travels and the average of B·A is exact;
- HiWi: its adapters A and B, which keep training in the next round. Its artifact stores the
  new biases P' = P + f(P A) B, a nonlinear function of A and B, so the average is not exact
  (like LoRA's); averaging P' instead would be exact for one round but leaves clients nothing to
  continue training from.
Bytes are measured from what Flower serialises (the `RecordDict`'s protobuf).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from microtune.model import TaskModel

POSITIONS = "method.positions"  # PaFi's mask positions, when they travel


def travelling_names(model: TaskModel, lora_frozen_a: bool = False) -> list[str]:
    """The trainable tensors a client sends, by name (LoRA's A left out when frozen)."""
    names = list(model.trainable_state())
    if lora_frozen_a:
        names = [name for name in names if not name.endswith(".A")]
    return names


def freeze_untravelled(model: TaskModel, lora_frozen_a: bool) -> None:
    """On a client: what does not travel does not train (LoRA's frozen A)."""
    keep = set(travelling_names(model, lora_frozen_a))
    for name, parameter in model.trainable_state().items():
        if name not in keep:
            parameter.requires_grad_(False)


def sends_positions(model: TaskModel) -> bool:
    method = model.method
    return (
        method is not None
        and getattr(method.config, "store_indices", False)
        and hasattr(method, "positions")
    )


def to_arrays(model: TaskModel, names: list[str], positions: bool = True) -> ArrayRecord:
    """The named trainable tensors (float32, CPU) and, for PaFi with indices, its positions
    (a client's reply; the server's global state never carries them, so Flower's strategies
    and DP wrappers see the same names going out and coming back)."""
    trainable = model.trainable_state()
    arrays = {name: _array(trainable[name]) for name in names}
    if positions and sends_positions(model):
        arrays[POSITIONS] = _array(model.method.positions)
    return ArrayRecord(arrays)


def _array(tensor: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))


def expected_shapes(model: TaskModel, names: list[str]) -> dict[str, tuple[int, ...]]:
    trainable = model.trainable_state()
    shapes = {name: tuple(trainable[name].shape) for name in names}
    if sends_positions(model):
        shapes[POSITIONS] = tuple(model.method.positions.shape)
    return shapes


@torch.no_grad()
def load_arrays(model: TaskModel, arrays: ArrayRecord) -> None:
    """Copy received tensors into the model's trainable tensors (positions are checked, not
    loaded: see `positions_problem`)."""
    trainable = dict(model.named_parameters())
    for name, array in arrays.items():
        if name == POSITIONS:
            continue
        target = trainable[name]
        target.copy_(torch.from_numpy(array.numpy()).to(target.device, target.dtype))


def positions_problem(model: TaskModel, arrays: ArrayRecord) -> str | None:
    """Why received PaFi positions are not this model's mask (None when they are, or absent)."""
    if POSITIONS not in arrays or not sends_positions(model):
        return None
    own = model.method.positions.cpu().numpy()
    if not np.array_equal(arrays[POSITIONS].numpy(), own):
        return "its PaFi mask positions differ from the server's"
    return None


def arrays_problem(arrays: ArrayRecord, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's arrays cannot be averaged (None when they can): missing or extra tensors,
    a wrong shape, or values that are not finite."""
    if set(arrays) != set(shapes):
        missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
        return f"it sent the wrong tensors (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, shape in shapes.items():
        array = arrays[name]
        if tuple(array.shape) != shape:
            return f"{name} has shape {tuple(array.shape)}, expected {shape}"
        if name != POSITIONS and not np.isfinite(array.numpy()).all():
            return f"{name} holds values that are not finite"
    return None


def serialised_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower puts it on the wire (its protobuf)."""
    return recorddict_to_proto(content).ByteSize()
