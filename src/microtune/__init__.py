"""microtune: fine-tune pretrained transformers with a few thousand parameters per task."""

__version__ = "0.1.0"
