"""PaFi (Liao, Meng, Monz, ACL 2023): train the k smallest-magnitude pretrained weights.

The mask is a pure function of the base weights, the candidate set and k (methods.md §4):
candidates are taken in a fixed global order (candidate order in the model, then the flat index
of each stored weight tensor; GPT-2's Conv1D is indexed as stored, (in, out)), scored (|w|, -|w|
or seeded uniform noise for the "smallest", "largest" and "random" masks) and the k lowest
scores win under one global threshold, ties going to the lower global position. The selection
streams matrix by matrix and keeps a pool of at most k (score, position) pairs, so its extra
memory is O(k) plus one matrix: it never holds a second copy of the model.

Training keeps ONE dense float32 vector `values` of length k: the current values of the
selected weights, in ascending global position, initialised to their pretrained values. (Values,
not deltas: AdamW's weight decay then pulls them to zero as full fine-tuning would, and merging
is a plain write.) Each forward pass substitutes the patched weights W' = W with W[mask] =
values through `torch.func.functional_call`, so the backbone is never modified or subclassed
and every unmasked entry stays bit-identical; gradients and optimizer state are O(k). Merging
writes the values into the weights (the merged model computes bit-for-bit what training saw);
`unmerge` writes the original values back.

The artifact stores the k values and the head; `microtune.json` records the mask fingerprint
(SHA-256 over the candidates' names and shapes and the sorted global positions). Loading
recomputes the mask from the base model and refuses a mismatch; with `store_indices` the
positions are stored (int64) and used instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from microtune.backbone.arch import ArchSpec
from microtune.errors import MicrotuneError
from microtune.methods.base import Method, SwappedValues, copy_matching
from microtune.methods.configs.pafi import MASKS as MASKS  # re-exported
from microtune.methods.configs.pafi import PaFiConfig, PaFiState

POSITIONS_KEY = "method.positions"


# -- the candidates ------------------------------------------------------------------------


def _matches(path: str, pattern: str) -> bool:
    return path == pattern or path.endswith("." + pattern)


def candidate_weights(
    backbone: nn.Module, arch: ArchSpec, patterns: str = ""
) -> list[tuple[str, nn.Parameter]]:
    """The candidate tensors as (name in the backbone, parameter), in model order."""
    names = [p.strip() for p in patterns.split(",") if p.strip()]
    parameters = dict(backbone.named_parameters())
    chosen: set[str] = set()
    if names:
        for pattern in names:
            hits = {
                n for n in parameters if _matches(n, pattern) or _matches(n, pattern + ".weight")
            }
            if not hits:
                raise MicrotuneError(f"pafi: candidate '{pattern}' matches no parameter")
            chosen |= hits
    else:
        for layer, block in enumerate(arch.blocks_of(backbone)):
            prefix = f"{arch.blocks}.{layer}."
            for path, module in block.named_modules():
                wanted = (
                    any(_matches(path, p) for p in arch.weight_candidates)
                    if arch.weight_candidates
                    else isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
                )
                if wanted:
                    chosen.add(prefix + path + ".weight")
    # Model order (named_parameters), the same at every load: it fixes the global positions.
    return [(n, p) for n, p in parameters.items() if n in chosen]


# -- the mask: streaming selection -----------------------------------------------------------


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k smallest values; among equal values the lower index wins."""
    if values.numel() <= k:
        return torch.arange(values.numel())
    kth = torch.kthvalue(values, k).values
    below = values < kth
    ties = (values == kth).nonzero().squeeze(1)[: k - int(below.sum())]
    below[ties] = True
    return below.nonzero().squeeze(1)


def select_lowest(scores: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """Global positions (ascending int64) of the k lowest scores over a stream of 1-D tensors.

    Position = offset of the tensor in the stream + index inside it. Ties go to the lower
    position. Each tensor contributes at most k entries below the current threshold (the k-th
    lowest score kept so far) to a pool; the pool is cut back to k whenever it reaches 2k, so
    it never holds more than 3k (score, position) pairs, besides the current tensor, which is
    released before the next one is requested.
    """
    pool_scores, pool_positions = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    pooled, offset, threshold = 0, 0, None

    def cut() -> None:
        scores_, positions_ = torch.cat(pool_scores), torch.cat(pool_positions)
        keep = _smallest(scores_, k)  # pooled in ascending position, so ties keep the earliest
        pool_scores[:] = [scores_[keep]]
        pool_positions[:] = [positions_[keep]]

    for score in scores:
        if threshold is None:
            index = _smallest(score, k)
        else:
            # Later positions lose ties, so only strictly lower scores can enter the pool.
            index = (score < threshold).nonzero().squeeze(1)
            index = index[_smallest(score[index], k)]
        pool_scores.append(score[index])
        pool_positions.append(index + offset)
        offset += score.numel()
        del score  # release the matrix before the stream builds the next one
        pooled += index.numel()
        if pooled >= 2 * k:
            cut()
            pooled, threshold = k, pool_scores[0].max()
    cut()
    if pool_positions[0].numel() < k:
        raise MicrotuneError(f"pafi: k={k} exceeds the {offset} candidate weights")
    return pool_positions[0]


def mask_scores(
    weights: Iterable[torch.Tensor], mask: str, seed: int = 0
) -> Iterator[torch.Tensor]:
    """One flat float32 CPU score tensor per candidate, generated lazily (lower is chosen).

    Each score is yielded without a local name, so this generator holds no reference to it
    while the next one is built: one score matrix is alive at a time."""
    generator = torch.Generator().manual_seed(seed)
    for weight in weights:
        yield _score(weight, mask, generator)


def _score(weight: torch.Tensor, mask: str, generator: torch.Generator) -> torch.Tensor:
    if mask == "random":
        return torch.rand(weight.numel(), generator=generator)
    score = weight.detach().reshape(-1).to("cpu", torch.float32).abs()
    return score.neg_() if mask == "largest" else score


def mask_fingerprint(candidates: list[tuple[str, torch.Tensor]], positions: torch.Tensor) -> str:
    """SHA-256 over the candidates' names and shapes and the sorted global positions."""
    digest = hashlib.sha256()
    for name, tensor in candidates:
        digest.update(f"{name}|{tuple(tensor.shape)}\n".encode())
    digest.update(positions.to("cpu", torch.long).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def compute_mask(candidates: list[tuple[str, torch.Tensor]], config: PaFiConfig) -> torch.Tensor:
    """The mask's global positions for these candidates (ascending int64, CPU)."""
    total = sum(t.numel() for _, t in candidates)
    k = config.count(total)
    scores = mask_scores((t for _, t in candidates), config.mask, config.mask_seed)
    return select_lowest(scores, k)


# -- the method --------------------------------------------------------------------------------


class PaFi(Method):
    """Trains k selected pretrained weights, held as one dense vector; merges by writing them."""

    name = "pafi"
    config_class = PaFiConfig
    state_schema = PaFiState
    # The evidence grid's tuned rate (1,000 steps on slices of SST-2, CoLA and STS-B): 8e-3
    # and 4e-3 within 0.001 of each other, 1e-3 0.064 lower (bench/configs/evidence-lrs.toml).
    default_learning_rate = 8e-3
    mixed_batch = "pafi"

    def __init__(self, config: PaFiConfig):
        super().__init__(config)
        self._candidates: list[tuple[str, nn.Parameter]] = []
        self._offsets: list[int] = []  # global position of each candidate's first entry
        self.merged = False

    def attach(self, backbone: nn.Module, arch: ArchSpec) -> None:
        self._candidates = candidate_weights(backbone, arch, self.config.candidates)
        if not self._candidates:
            raise MicrotuneError("pafi: this model has no candidate weights")
        self._offsets = [0]
        for _, tensor in self._candidates:
            self._offsets.append(self._offsets[-1] + tensor.numel())
        self._use_positions(compute_mask(self._candidates, self.config))
        self.values = nn.Parameter(self.original.to(torch.float32, copy=True))

    @property
    def total_candidates(self) -> int:
        return self._offsets[-1]

    def _use_positions(self, positions: torch.Tensor) -> None:
        """Index the mask: positions and the pretrained values there, as non-persistent buffers."""
        device = self._candidates[0][1].device
        self.register_buffer("positions", positions.to(device, torch.long), persistent=False)
        self.mask_fingerprint = mask_fingerprint(self._candidates, positions)
        with torch.no_grad():
            original = [weight.reshape(-1)[local] for weight, local in self._pieces()]
        self.register_buffer("original", torch.cat(original), persistent=False)

    def _pieces(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """(weight, flat indices into it) per candidate, in the order of `values`."""
        bounds = torch.searchsorted(
            self.positions, torch.tensor(self._offsets, device=self.positions.device)
        ).tolist()
        for (_, weight), offset, start, end in zip(
            self._candidates, self._offsets, bounds, bounds[1:], strict=False
        ):
            yield weight, self.positions[start:end] - offset

    def patched_weights(self) -> dict[str, torch.Tensor]:
        """Every candidate with selected entries, as W with W[mask] = values (differentiable)."""
        patched = {}
        start = 0
        names = (name for name, _ in self._candidates)
        for name, (weight, local) in zip(names, self._pieces(), strict=True):
            end = start + local.numel()
            if end > start:
                values = self.values[start:end].to(weight.dtype)
                flat = torch.index_put(weight.reshape(-1), (local,), values)
                patched[name] = flat.view_as(weight)
            start = end
        return patched

    def run_backbone(self, backbone: nn.Module, **inputs: torch.Tensor) -> Any:
        if self.merged:
            return backbone(**inputs)
        return functional_call(backbone, self.patched_weights(), args=(), kwargs=inputs)

    @torch.no_grad()
    def _write(self, source: torch.Tensor) -> None:
        start = 0
        for weight, local in self._pieces():
            end = start + local.numel()
            weight.view(-1)[local] = source[start:end].to(weight.dtype)
            start = end

    def merge(self, backbone: nn.Module, arch: ArchSpec) -> list[str]:
        """Write the trained values into the weights; nothing else changes, no bias is made."""
        if self.merged:
            raise MicrotuneError("pafi: already merged")
        self._write(self.values)
        self.merged = True
        return []

    def unmerge(self) -> None:
        """Undo `merge` exactly: the pretrained bits of the k entries are written back."""
        if not self.merged:
            raise MicrotuneError("pafi: not merged, nothing to unmerge")
        self._write(self.original)
        self.merged = False

    def swapped_values(self) -> SwappedValues:
        """Its values, swapped in by `merge` and out by `unmerge` (O(k)); tasks on one mask
        share its positions and original values."""
        return SwappedValues(
            group=self.mask_fingerprint,
            own=(self.values,),
            shared=(self.positions, self.original),
            swap_in=self._swap_in,
            swap_out=self.unmerge,
            use_shared=self._use_shared,
        )

    def _swap_in(self) -> None:
        self.merge(None, None)  # type: ignore[arg-type]  # PaFi's merge reads neither

    def _use_shared(self, shared: tuple[torch.Tensor, ...]) -> None:
        self.positions, self.original = shared

    # -- what the artifact stores ------------------------------------------------------------

    def stored_state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stored = dict(trainable)
        if self.config.store_indices:
            stored[POSITIONS_KEY] = self.positions
        return stored

    def stored_metadata(self) -> dict[str, Any]:
        return {
            "mask_fingerprint": self.mask_fingerprint,
            "k": self.positions.numel(),
            "candidates": self.total_candidates,
        }

    def load_stored_state(
        self,
        stored: dict[str, torch.Tensor],
        trainable: dict[str, torch.Tensor],
        metadata: dict[str, Any],
    ) -> None:
        stored = dict(stored)
        positions = stored.pop(POSITIONS_KEY, None)
        expected = metadata.get("mask_fingerprint")
        if positions is not None:
            self._check_positions(positions, metadata)
            self._use_positions(positions)
        elif expected is None:
            raise MicrotuneError(
                "pafi: the artifact records no mask fingerprint; re-save it with this version"
            )
        if self.mask_fingerprint != expected:
            where = "stored" if positions is not None else "recomputed from this base model"
            raise MicrotuneError(
                f"pafi: the mask {where} ({self.mask_fingerprint[:19]}…) differs from the "
                f"artifact's ({str(expected)[:19]}…): the base weights or candidates changed; "
                "load it with the original base model, or train with --store-indices"
            )
        copy_matching(stored, trainable)

    def _check_positions(self, positions: torch.Tensor, metadata: dict[str, Any]) -> None:
        k = self.values.numel()
        if positions.dtype != torch.long or positions.shape != (k,):
            raise MicrotuneError(f"pafi: stored positions must be {k} int64 values")
        total = metadata.get("candidates", self.total_candidates)
        if total != self.total_candidates:
            raise MicrotuneError(
                f"pafi: the artifact was made for {total} candidate weights, this model has "
                f"{self.total_candidates}; load it with the original base model"
            )
        ascending = bool((positions[1:] > positions[:-1]).all()) if k > 1 else True
        if not ascending or int(positions[0]) < 0 or int(positions[-1]) >= total:
            raise MicrotuneError("pafi: stored positions are not ascending within range")
