"""microtune: fine-tune pretrained transformers with a few thousand parameters per task.

What users call, all here:

    import microtune
    config = microtune.TrainConfig(max_steps=500)
    report = microtune.train("rte", "slash", "runs/rte", train_config=config)
    model = microtune.load("runs/rte")               # predict, logits, merge, save_pretrained
    tasks = microtune.load_many(["runs/rte", "..."])  # many tasks on one base, mixed batches

Each name is imported on first use, so `import microtune` stays cheap: no torch, no
transformers (the command line's parser relies on it).
"""

from microtune.version import __version__

# name -> the module that defines it
_PUBLIC = {
    "train": "microtune.api",
    "evaluate_artifact": "microtune.api",
    "export_and_check": "microtune.api",
    "load": "microtune.serving.tuned",
    "load_many": "microtune.serving.multitask",
    "TrainConfig": "microtune.training.config",
    "DataSource": "microtune.tasks.spec",
    "ModelOptions": "microtune.backbone.options",
    "DPConfig": "microtune.privacy.config",
    "ServeConfig": "microtune.serving.config",
    "MicrotuneError": "microtune.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'microtune' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
