"""Read-outs (which hidden state represents the sequence) and the task head on top of it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from microtune.common.choices import READOUTS


def read_out(
    readout: str,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    mask_token_id: int | None = None,
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce hidden states (B, T, D) to one feature per example (B, D); "tokens" keeps them."""
    if readout == "tokens":
        return hidden
    if readout == "first":
        return hidden[:, 0]
    if readout == "mean":
        # In float32 whatever the base's precision: a bfloat16 sum over tokens loses digits.
        weights = attention_mask.to(torch.float32).unsqueeze(-1)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if readout == "last":
        # The rightmost attended position, right- or left-padded (as the stock decoder
        # `...ForSequenceClassification` classes read the rightmost non-pad token).
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * (attention_mask != 0)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if readout == "mask":
        is_mask = input_ids == mask_token_id
        if not bool(is_mask.any(1).all()):
            raise ValueError("mask read-out: an example has no mask token; encode with it")
        position = is_mask.long().argmax(1)  # the first mask token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), position]
    if readout == "pooler":
        if pooled is None:
            raise ValueError("pooler read-out: this backbone has no pooler; use first or mean")
        return pooled
    raise ValueError(f"read-out '{readout}' is unknown; use one of {READOUTS}")


class TaskHead(nn.Module):
    """Dropout then one linear layer: num_labels logits, or 1 output for regression; on
    features (B, D), or per token on (B, T, D). `bias=False`: no bias, as the bias-free
    `score` of the stock decoder classification classes."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels, bias=bias)
        self._rows: dict[str, torch.Tensor] | None = None  # per-example copies (DP path)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        if self._rows is None:
            return self.linear(features)
        # Row b of the batch uses its own copy of the weight (B, C, D) and bias (B, C).
        out = torch.einsum("b...d,bcd->b...c", features, self._rows["weight"])
        bias = self._rows.get("bias")
        if bias is None:
            return out
        return out + bias.view(bias.shape[0], *([1] * (out.dim() - 2)), bias.shape[-1])

    @contextlib.contextmanager
    def per_example_parameters(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The linear's weight (and bias) as per-example leaves, for DP's fast path."""
        self._rows = {
            name: p.detach().expand(batch_size, *p.shape).clone().requires_grad_(True)
            for name, p in self.linear.named_parameters()
        }
        try:
            yield dict(self._rows)
        finally:
            self._rows = None


def default_readout(model_type_is_causal: bool) -> str:
    """Mean pooling for encoders (what sentence encoders such as MiniLM were trained for), the
    last token for decoders (the only one that has seen the whole sequence)."""
    return "last" if model_type_is_causal else "mean"
