"""Per-example gradients of a model's trainable tensors, for DP-SGD (methods.md §7).

Four exact paths, chosen per model, never per method name:

- substitution (fast): the model offers `per_example_parameters(batch_size)`, a context in
  which every trainable tensor is replaced by a per-example leaf of shape (B, *shape) that
  example b alone uses (SLaSh / JR-WARP's z_b, so block l adds z_b W_l; the head's linear with
  a (B, C, D) weight). One backward of the summed loss leaves ∂L_b/∂θ in row b of each leaf's
  gradient: for SLaSh that is Σ_l g_{b,l} W_lᵀ, with no per-example weight gradient.
- vmap (general): `torch.func.vmap(grad(...))` of `functional_call` over the trainable
  tensors only, in chunks of examples that bound the (chunk, *shape) gradients in memory.
- ghost (linear layers, norms and embeddings): when every trainable tensor is the weight or
  bias of an `nn.Linear`, GPT-2 `Conv1D`, `nn.LayerNorm` or `nn.Embedding` (full fine-tuning,
  BitFit, the linear probe on encoders), forward hooks keep each layer's input and one backward
  pass gives the gradient at its output. Each example's squared gradient norm follows without
  the gradient itself: for a linear layer over T positions, ||Σ_t g_t a_tᵀ||² =
  Σ_{t,s} (a_t·a_s)(g_t·g_s) (the "ghost norm", used when T² < in·out, else the (out, in)
  gradient per example). The clipped sum is then one weighted product per layer, Σ_b c_b Σ_t
  g_bt a_btᵀ, so a private step costs about one non-private step, whatever the layer sizes.
- loop: one example at a time, when vmap cannot trace the model (the reference in tests).

`engine_for(model, parameters)` picks the first that covers the model, in the order substitution,
ghost, vmap. Every engine offers `clipped_sum(inputs, labels, clip)`, what DP-SGD needs, and
yields per-example gradients when called (the ghost path materialises them only for tests).

The model must be in eval mode (no dropout) while these run; `DPStep.train_mode` sees to it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from microtune.errors import MicrotuneError
from microtune.tasks.types import loss_fn, loss_for

# Per-example gradient numbers held at once on the vmap path (float32: 256 MiB).
GRADIENT_BUDGET = 2**26

Gradients = dict[str, torch.Tensor]


def example_losses(
    logits: torch.Tensor, labels: torch.Tensor, model: nn.Module | None = None
) -> torch.Tensor:
    """One loss per example, by the model's task type (`microtune.tasks.types.loss_for`); without a
    model, the sentence-level loss (cross-entropy, or squared error for one output)."""

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


def engine_for(model: nn.Module, parameters: dict[str, nn.Parameter]):
    """The cheapest exact per-example engine for this model: substitution, ghost, else vmap."""
    engine = PerExampleGradients(model, parameters)
    if engine.path == "vmap" and GhostClipping.covers(model, parameters):
        return GhostClipping(model, parameters, fallback=engine)
    return engine


def clip_factors(squared_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / ||g_b||): each example's flat gradient scaled to norm at most C."""
    return (clip / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)


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

    def clipped_sum(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, clip: float
    ) -> tuple[torch.Tensor, Gradients]:
        """(per-example losses, Σ_b c_b ∂L_b/∂θ) with each example's flat norm clipped to C."""
        sums = {name: torch.zeros_like(p) for name, p in self.parameters.items()}
        all_losses = []
        for losses, grads in self(inputs, labels):
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0)
            factors = clip_factors(norms, clip)
            for name, grad in grads.items():
                sums[name] += torch.tensordot(factors.to(grad.dtype), grad, dims=1)
            all_losses.append(losses)
        return torch.cat(all_losses), sums

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


# -- ghost clipping --------------------------------------------------------------------------


class _NotGhostable(Exception):
    """This forward pass breaks an assumption of the ghost path (a layer called twice, an
    output changed in place); the vmap path takes over."""


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
        return "conv1d"
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return "layernorm"
    if (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.sparse
        and not module.scale_grad_by_freq  # a per-batch rescaling: not a sum over examples
    ):
        return "embedding"
    return None


class GhostClipping:
    """Per-example clipping for models whose trainable tensors all sit in linear layers,
    LayerNorms and embeddings (see the module docstring)."""

    path = "ghost"

    def __init__(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter],
        fallback: PerExampleGradients | None = None,
    ):
        check_supported(model)
        self.model = model
        self.parameters = parameters
        self.fallback = fallback or PerExampleGradients(model, parameters)
        self.ghostable = True  # until a forward pass breaks an assumption (see _NotGhostable)
        owner = {id(p): n for n, p in parameters.items()}
        # (module, {"weight": name, "bias": name}) for each layer owning a trainable tensor.
        self.layers = []
        for module in model.modules():
            names = {
                kind: owner[id(p)]
                for kind, p in module.named_parameters(recurse=False)
                if id(p) in owner
            }
            if names:
                self.layers.append((module, names))

    @staticmethod
    def covers(model: nn.Module, parameters: dict[str, nn.Parameter]) -> bool:
        """Every trainable tensor is the weight or bias of exactly one supported layer."""
        wanted = {id(p) for p in parameters.values()}
        found: dict[int, int] = {}
        for module in model.modules():
            for kind, p in module.named_parameters(recurse=False):
                if id(p) not in wanted:
                    continue
                if _layer_kind(module) is None or kind not in ("weight", "bias"):
                    return False
                found[id(p)] = found.get(id(p), 0) + 1
        return set(found) == wanted and all(count == 1 for count in found.values())

    def __call__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> Iterator:
        """Per-example gradients, materialised (for tests and small models)."""
        if not self.ghostable:
            yield from self.fallback(inputs, labels)
            return
        try:
            losses, records = self._forward_backward(inputs, labels)
        except _NotGhostable as why:
            warnings.warn(f"per-example gradients: {why}; using the torch.func path", stacklevel=2)
            self.ghostable = False
            yield from self.fallback(inputs, labels)
            return
        grads: Gradients = {}
        for (module, names), (a, g) in zip(self.layers, records, strict=True):
            for kind, name in names.items():
                shape = (len(labels), *self.parameters[name].shape)
                parameter = self.parameters[name]
                grads[name] = (
                    torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
                    if g is None
                    else _per_example_grad(module, kind, a, g)
                )
        yield losses, grads

    def clipped_sum(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, clip: float
    ) -> tuple[torch.Tensor, Gradients]:
        if not self.ghostable:
            return self.fallback.clipped_sum(inputs, labels, clip)
        try:
            losses, records = self._forward_backward(inputs, labels)
        except _NotGhostable as why:
            warnings.warn(f"per-example gradients: {why}; using the torch.func path", stacklevel=2)
            self.ghostable = False  # for the rest of the run
            return self.fallback.clipped_sum(inputs, labels, clip)
        squared = torch.zeros(len(labels), dtype=torch.float32, device=labels.device)
        for (module, names), (a, g) in zip(self.layers, records, strict=True):
            if g is not None:
                for kind in names:
                    squared += _squared_norm(module, kind, a, g).float()
        factors = clip_factors(squared, clip)
        sums = {}
        for (module, names), (a, g) in zip(self.layers, records, strict=True):
            for kind, name in names.items():
                sums[name] = (
                    torch.zeros_like(self.parameters[name])
                    if g is None
                    else _weighted_sum(module, kind, a, g, factors.to(g.dtype))
                )
        return losses, sums

    def _forward_backward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        """Losses, and per layer (its input a, the gradient g of the summed loss at its output);
        g is None for a layer the loss does not reach."""
        batch = len(labels)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

        def broadcast_to_batch(module, args):
            # Position ids come as (1, T): expanded, each example gets its own gradient rows.
            if args and args[0].dim() >= 1 and args[0].shape[0] == 1 and batch > 1:
                return (args[0].expand(batch, *args[0].shape[1:]), *args[1:])
            return None

        def keep(module, args, output):
            if id(module) in seen:
                raise _NotGhostable(f"{type(module).__name__} is called twice in one forward")
            if output.shape[0] != batch:
                raise _NotGhostable(f"{type(module).__name__} output is not per example")
            seen[id(module)] = (args[0].detach(), output, output._version)

        handles = []
        for module, _ in self.layers:
            if _layer_kind(module) == "embedding":
                handles.append(module.register_forward_pre_hook(broadcast_to_batch))
            handles.append(module.register_forward_hook(keep))
        try:
            losses = example_losses(self.model(**inputs), labels, self.model)
        finally:
            for handle in handles:
                handle.remove()
        reached = [(m, seen[id(m)]) for m, _ in self.layers if id(m) in seen]
        for module, (_, output, version) in reached:
            if output._version != version:
                raise _NotGhostable(f"{type(module).__name__} output was changed in place")
        outputs = [output for _, (_, output, _) in reached]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        by_module = {id(m): (a, g) for (m, (a, _, _)), g in zip(reached, grads, strict=True)}
        records = [by_module.get(id(m), (None, None)) for m, _ in self.layers]
        return losses.detach(), records


def _as_sequence(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F): every position between batch and features is one 'token'."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _layernorm_input_normalised(module: nn.LayerNorm, a: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(a, module.normalized_shape, eps=module.eps)


def _per_example_grad(module: nn.Module, kind: str, a, g) -> torch.Tensor:
    layer = _layer_kind(module)
    g3 = _as_sequence(g)
    if kind == "bias":
        return g3.sum(1)
    if layer == "linear":
        return torch.einsum("bto,bti->boi", g3, _as_sequence(a))
    if layer == "conv1d":
        return torch.einsum("bti,bto->bio", _as_sequence(a), g3)
    if layer == "layernorm":
        return (g3 * _as_sequence(_layernorm_input_normalised(module, a))).sum(1)
    ids = a.reshape(a.shape[0], -1)  # embedding
    out = torch.zeros(len(ids), *module.weight.shape, dtype=g.dtype, device=g.device)
    rows = _embedding_rows(module, ids, g3)
    return out.scatter_add_(1, ids.unsqueeze(-1).expand_as(rows), rows)


def _embedding_rows(module: nn.Embedding, ids: torch.Tensor, g3: torch.Tensor) -> torch.Tensor:
    """The gradient rows each position adds to its token's row (none for the padding index)."""
    if module.padding_idx is None:
        return g3
    return g3 * (ids != module.padding_idx).unsqueeze(-1).to(g3.dtype)


def _squared_norm(module: nn.Module, kind: str, a, g) -> torch.Tensor:
    layer = _layer_kind(module)
    g3 = _as_sequence(g)
    if kind == "bias":
        return g3.sum(1).pow(2).sum(1)
    if layer in ("linear", "conv1d"):
        a3 = _as_sequence(a)
        steps, width = a3.shape[1], a3.shape[2] * g3.shape[2]
        if steps * steps < width:  # the ghost norm: no (out, in) gradient per example
            gram_a = torch.bmm(a3, a3.transpose(1, 2))
            gram_g = torch.bmm(g3, g3.transpose(1, 2))
            return (gram_a * gram_g).sum((1, 2))
        return _per_example_grad(module, kind, a, g).flatten(1).pow(2).sum(1)
    if layer == "layernorm":
        return _per_example_grad(module, kind, a, g).pow(2).sum(1)
    ids = a.reshape(a.shape[0], -1)  # embedding: rows of the same token add up
    rows = _embedding_rows(module, ids, g3)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(rows.dtype)
    return (same * torch.bmm(rows, rows.transpose(1, 2))).sum((1, 2))


def _weighted_sum(module: nn.Module, kind: str, a, g, factors: torch.Tensor) -> torch.Tensor:
    """Σ_b c_b ∂L_b/∂θ for one tensor: the ordinary gradient with example b's rows scaled."""
    layer = _layer_kind(module)
    g3 = _as_sequence(g) * factors.view(-1, 1, 1)
    if kind == "bias":
        return g3.sum((0, 1))
    if layer == "linear":
        return torch.einsum("bto,bti->oi", g3, _as_sequence(a))
    if layer == "conv1d":
        return torch.einsum("bti,bto->io", _as_sequence(a), g3)
    if layer == "layernorm":
        return (g3 * _as_sequence(_layernorm_input_normalised(module, a))).sum((0, 1))
    ids = a.reshape(a.shape[0], -1)
    rows = _embedding_rows(module, ids, g3).reshape(-1, g3.shape[-1])
    return torch.zeros_like(module.weight).index_add_(0, ids.flatten(), rows)
