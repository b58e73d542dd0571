"""microtune: fine-tune pretrained transformers with a few thousand parameters per task."""

from microtune.version import __version__

__all__ = ["__version__", "load", "load_many"]


def __getattr__(name: str):
    """`microtune.load` (see `microtune.serving`), imported on first use so that
    `import microtune` stays cheap: no torch, no transformers."""
    if name == "load":
        from microtune.serving import load

        return load
    if name == "load_many":  # many tasks on one base, mixed batches (`microtune.multitask`)
        from microtune.multitask import load_many

        return load_many
    raise AttributeError(f"module 'microtune' has no attribute '{name}'")
