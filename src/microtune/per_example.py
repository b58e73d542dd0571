"""Per-example gradients of a model's trainable tensors, for DP-SGD (methods.md §7).

Three exact paths, chosen per model, never per method name:

- substitution (fast): the model offers `per_example_parameters(batch_size)`, a context in
  which every trainable tensor is replaced by a per-example leaf of shape (B, *shape) that
  example b alone uses (SLaSh / JR-WARP's z_b, so block l adds z_b W_l; the head's linear with
  a (B, C, D) weight). One backward of the summed loss leaves ∂L_b/∂θ in row b of each leaf's
  gradient: for SLaSh that is Σ_l g_{b,l} W_lᵀ, with no per-example weight gradient.
- vmap (general): `torch.func.vmap(grad(...))` of `functional_call` over the trainable
  tensors only, in chunks of examples that bound the (chunk, *shape) gradients in memory.
- loop: one example at a time, when vmap cannot trace the model (the reference in tests).

The model must be in eval mode (no dropout) while these run; `DPStep.train_mode` sees to it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from microtune.errors import MicrotuneError

# Per-example gradient numbers held at once on the vmap path (float32: 256 MiB).
GRADIENT_BUDGET = 2**26

Gradients = dict[str, torch.Tensor]


def example_losses(
    logits: torch.Tensor, labels: torch.Tensor, model: nn.Module | None = None
) -> torch.Tensor:
    """One loss per example, by the model's task type (`microtune.train.loss_for`); without a
    model, the sentence-level loss (cross-entropy, or squared error for one output)."""
    from microtune.train import loss_fn, loss_for

    return (loss_fn if model is None else loss_for(model))(logits, labels, reduction="none")


def check_supported(model: nn.Module) -> None:
    """Refuse models for which no per-example gradient exists, with one line."""
    for module in model.modules():
        if getattr(module, "supports_per_example", True) is False:
            name = getattr(module, "name", type(module).__name__)
            raise MicrotuneError(
                f"method '{name}' has no per-example gradients (its forward mixes examples), "
                "so it cannot train with differential privacy; drop the --dp-* options"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise MicrotuneError(
                f"{type(module).__name__} mixes the examples of a batch, so this model cannot "
                "train with differential privacy"
            )


class PerExampleGradients:
    """Callable: (inputs, labels) of a micro-batch -> chunks of (losses, per-example grads)."""

    def __init__(self, model: nn.Module, parameters: dict[str, nn.Parameter]):
        check_supported(model)
        self.model = model
        self.parameters = parameters
        self.path = "substitution" if self._substitution_covers_all() else "vmap"
        numel = sum(p.numel() for p in parameters.values())
        self.chunk = max(1, GRADIENT_BUDGET // numel)

    def _substitution_covers_all(self) -> bool:
        offer = getattr(self.model, "per_example_parameters", None)
        if offer is None:
            return False
        with offer(1) as leaves:
            return set(leaves) == set(self.parameters)

    def __call__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> Iterator:
        if self.path == "substitution":
            yield self.substitution(inputs, labels)
            return
        for start in range(0, len(labels), self.chunk):
            part = {k: v[start : start + self.chunk] for k, v in inputs.items()}
            yield self.general(part, labels[start : start + self.chunk])

    def general(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        if self.path == "vmap":
            try:
                return self.vmap(inputs, labels)
            except (RuntimeError, ValueError) as error:  # data-dependent control flow, mostly
                warnings.warn(
                    "per-example gradients: torch.func.vmap cannot trace this model "
                    f"({str(error).splitlines()[0][:120]}); using the exact one-example loop",
                    stacklevel=2,
                )
                self.path = "loop"
        return self.loop(inputs, labels)

    def substitution(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        with self.model.per_example_parameters(len(labels)) as leaves:
            losses = example_losses(self.model(**inputs), labels, self.model)
            names = list(leaves)
            grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in names], allow_unused=True)
        return losses.detach(), {
            n: torch.zeros_like(leaves[n]) if g is None else g
            for n, g in zip(names, grads, strict=True)
        }

    def vmap(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        from torch.func import functional_call, grad_and_value, vmap

        model = self.model
        params = {n: p.detach() for n, p in self.parameters.items()}

        def one_loss(params, one_inputs, one_label):
            batch = {k: v.unsqueeze(0) for k, v in one_inputs.items()}
            logits = functional_call(model, params, args=(), kwargs=batch)
            return example_losses(logits, one_label.unsqueeze(0), model).sum()

        with _full_attention_masks(), warnings.catch_warnings():
            # "no batching rule for scaled_dot_product_attention": correct, only slower.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, losses = vmap(grad_and_value(one_loss), in_dims=(None, 0, 0))(
                params, inputs, labels
            )
        return losses.detach(), grads

    def loop(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        return loop_gradients(self.model, self.parameters, inputs, labels)


# transformers' shortcuts that skip building an attention mask when no row is padded: they test
# the mask's values (`mask.all()`), which vmap cannot trace. Skipping them only costs work.
_MASK_SHORTCUTS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")


@contextlib.contextmanager
def _full_attention_masks() -> Iterator[None]:
    """Inside vmap: always build the attention mask (the same result, no data-dependent branch)."""
    try:
        from transformers import masking_utils
    except ImportError:  # older transformers: no shortcut to disable
        yield
        return
    saved = {n: getattr(masking_utils, n) for n in _MASK_SHORTCUTS if hasattr(masking_utils, n)}
    try:
        for name in saved:
            setattr(masking_utils, name, _never)
        yield
    finally:
        for name, function in saved.items():
            setattr(masking_utils, name, function)


def _never(*args, **kwargs) -> bool:
    return False


def loop_gradients(
    model: nn.Module,
    parameters: dict[str, nn.Parameter],
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
) -> tuple[torch.Tensor, Gradients]:
    """Exact per-example gradients by one forward and backward pass per example."""
    names = list(parameters)
    losses, rows = [], []
    for i in range(len(labels)):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = example_losses(model(**one), labels[i : i + 1], model).sum()
        grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        rows.append(
            [
                torch.zeros_like(parameters[n]) if g is None else g
                for n, g in zip(names, grads, strict=True)
            ]
        )
        losses.append(loss.detach())
    stacked = {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}
    return torch.stack(losses), stacked
