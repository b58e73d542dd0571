"""Whether the Hugging Face hub may be reached: read at call time, as huggingface_hub reads it."""

import os

_TRUE = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a true value (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
