"""microtune: fine-tune pretrained transformers with a few thousand parameters per task."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`microtune.load` (see `microtune.serving`), imported on first use so that
    `import microtune` stays cheap: no torch, no transformers."""
    if name == "load":
        from microtune.serving import load

        return load
    raise AttributeError(f"module 'microtune' has no attribute '{name}'")
