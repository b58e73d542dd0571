"""The `peft` library's tuners as microtune methods: the peers of issue 10's comparison.

Each peer is peft's own implementation, attached to the backbone the way `get_peft_model`
does it (peft's tuner class built on the backbone, which swaps the target layers for peft's
wrapper layers in place), so it trains through microtune's data, loop, read-out, head,
artifact and merge, and only the method differs from ours:

- `peft-lora` (LoRA), `peft-vera` (VeRA), `peft-ia3` ((IA)³), `peft-unilora` (Uni-LoRA),
  `peft-tinylora` (TinyLoRA), `peft-shira` (SHiRA) and `peft-supertuning` (Super-Tuning, the
  closest relative of PaFi).
- Targets: peft's own defaults for BERT-like models, read through our `ArchSpec` so they work
  on every family: attention query and value for all but (IA)³, which rescales keys, values
  and the FFN's inner activation (the input of its second linear) as in its paper. Targets are
  passed to peft as full layer paths, so a suffix such as BERT's "output.dense" cannot also
  catch "attention.output.dense" (which peft's own IA3 default for BERT does).
- Trainable: exactly peft's adapter tensors, kept in float32 whatever the base dtype (peft's
  `autocast_adapter_dtype`); they live in the backbone, so the artifact names them
  `backbone.<layer>.<peft name>`. Their initial values come from the global torch RNG, which
  `api.train` seeds with --seed before attaching, so the same --seed gives the same start.
- Stored: only the trainable tensors. What peft draws or computes besides them (VeRA's shared
  random A and B, Uni-LoRA's index map and scales, TinyLoRA's SVD factors and random P, SHiRA's
  random mask, Super-Tuning's top-magnitude support) is frozen, regenerated on attach from the
  base weights and the seeds in the method options (`projection_seed`, `mask_seed`), and not
  stored: peft's `save_projection` / `save_precomputed_indices` are off. `microtune.json`
  records a SHA-256 over that frozen state (`frozen_fingerprint`), and loading refuses an
  artifact whose regenerated state differs (another base model, or another peft version or
  device whose SVD, sort or random stream differs).
- Merge: peft's `merge_and_unload` folds every adapter into its weight and puts the original
  layers back, so the merged backbone is the stock architecture. All seven peers merge.

peft is an optional dependency: building a peer without it fails with one line naming
`pip install 'microtune[peft]'`.

The package: `peft_peer` holds the machinery every peer shares, `frozen` fingerprints the frozen
state, `tuners` the seven peers; their configs live in the torch-free
`microtune.methods.configs.peers`.
"""

from __future__ import annotations

from microtune.methods.configs.peers import (
    PeerConfig,
    PeerState,
    PeftIA3Config,
    PeftLoRAConfig,
    PeftSHiRAConfig,
    PeftSuperTuningConfig,
    PeftTinyLoRAConfig,
    PeftUniLoRAConfig,
    PeftVeRAConfig,
)
from microtune.methods.peers.peft_peer import (
    ADAPTER,
    PEFT_INSTALL,
    PeftPeer,
    block_paths,
    require_peft,
    resolve_targets,
)
from microtune.methods.peers.tuners import (
    PEERS,
    PeftIA3,
    PeftLoRA,
    PeftSHiRA,
    PeftSuperTuning,
    PeftTinyLoRA,
    PeftUniLoRA,
    PeftVeRA,
)

__all__ = [
    "ADAPTER",
    "PEERS",
    "PEFT_INSTALL",
    "PeerConfig",
    "PeerState",
    "PeftIA3",
    "PeftIA3Config",
    "PeftLoRA",
    "PeftLoRAConfig",
    "PeftPeer",
    "PeftSHiRA",
    "PeftSHiRAConfig",
    "PeftSuperTuning",
    "PeftSuperTuningConfig",
    "PeftTinyLoRA",
    "PeftTinyLoRAConfig",
    "PeftUniLoRA",
    "PeftUniLoRAConfig",
    "PeftVeRA",
    "PeftVeRAConfig",
    "block_paths",
    "require_peft",
    "resolve_targets",
]
