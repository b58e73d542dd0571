"""Probe batches: the fixed token rows every export check runs through the task model and the
exported one (ONNX tracing, sentence-transformers, the stock task classes), and how their
logits are compared."""

from __future__ import annotations

from typing import Any

import torch

PADDINGS = ("right", "left", "none")


def probe_batch(task_model: Any, padding: str = "right", pad_id: int | None = None) -> dict:
    """Two rows of 6 and 3 real tokens (none of them the pad token) on the task model's device,
    padded on the right or left with `pad_id` (0 when None), or "none": two full rows. Batch
    and sequence are both > 1, so a tracer fixes neither axis. The mask read-out gets its mask
    token; token type ids where the architecture takes them."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    vocab = task_model.backbone.config.get_text_config().vocab_size
    device = next(task_model.parameters()).device
    pad = 0 if pad_id is None else pad_id
    ids = (torch.arange(12, device=device).view(2, 6) * 7 + 1) % vocab
    ids[ids == pad] = (pad + 1) % vocab
    if task_model.head_config.readout == "mask":
        ids[:, 1] = task_model.mask_token_id
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], device=device)
    if padding == "left":
        mask = mask.flip(1)
    elif padding == "none":
        mask = torch.ones_like(ids)
    inputs = {"input_ids": ids.where(mask.bool(), pad), "attention_mask": mask}
    if task_model.arch.token_type_ids:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


@torch.no_grad()
def task_logits(task_model: Any, inputs: dict) -> torch.Tensor:
    """The task model's float32 logits on a probe batch, in eval mode (its mode restored)."""
    was_training = task_model.training
    try:
        return task_model.eval()(**inputs).float()
    finally:
        task_model.train(was_training)


def logits_match(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """Same shape, and max |got - expected| within `tolerance` of the largest |logit| (at
    least 1)."""
    if got.shape != expected.shape:
        return False
    scale = max(1.0, float(expected.abs().max()))
    return float((got.float() - expected).abs().max()) <= tolerance * scale
