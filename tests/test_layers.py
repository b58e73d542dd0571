"""The layered core: its extension points work from outside the package, its command line
builds without the heavy stack, no module hides an import of ours inside a function, and an
artifact written before the layering loads and predicts what it did (to float rounding).

The layer contracts themselves are checked by `lint-imports` (pyproject.toml, `make lint`)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import microtune
from microtune import api
from microtune.artifacts.store import load_artifact
from microtune.backbone.arch import get_submodule
from microtune.common.files import CONFIG_FILE, METRICS_FILE
from microtune.errors import MicrotuneError
from microtune.methods import method_names, register_method, unregister_method
from microtune.methods.base import Method
from microtune.methods.configs.base import MethodConfig
from microtune.tasks.data import IGNORE_INDEX
from microtune.tasks.examples import load_examples
from microtune.tasks.inference import predict
from microtune.tasks.spec import TASKS, DataSource, Task, get_task
from microtune.tasks.types import register_task_type, type_of, unregister_task_type
from microtune.tasks.types.sequence import SequenceClassification
from microtune.training.callbacks import TrainerCallback
from microtune.training.config import TrainConfig
from microtune.training.plugins import Plugins

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "microtune"
FIXTURE = Path(__file__).parent / "fixtures" / "pre_layering"


# -- a toy method, task type and trainer plug-in, registered from outside the package ---------


@dataclasses.dataclass
class ToyShiftConfig(MethodConfig):
    """A toy method's options."""

    dropout: bool = dataclasses.field(default=False, metadata={"help": "keep backbone dropout"})


class ToyShift(Method):
    """One trainable vector added to the last block's FFN output; merges into its bias."""

    name = "toy-shift"
    config_class = ToyShiftConfig
    default_learning_rate = 5e-2

    def attach(self, backbone: nn.Module, arch) -> None:
        self.shift = nn.Parameter(torch.zeros(backbone.config.hidden_size))
        block = get_submodule(backbone, arch.blocks)[-1]
        self.site = get_submodule(block, arch.ffn_out)
        self.hook = self.site.register_forward_hook(lambda module, args, out: out + self.shift)

    def merge(self, backbone: nn.Module, arch) -> list[str]:
        with torch.no_grad():
            self.site.bias += self.shift.to(self.site.bias.dtype)
        self.hook.remove()
        return []


class ToyClassification(SequenceClassification):
    """A task type from outside: sentence classification scored by accuracy alone."""

    name = "toy-classification"
    metrics = ("accuracy",)


@dataclasses.dataclass
class StopAfter:
    """A trainer plug-in: a callback that ends training after `steps` steps."""

    steps: int
    name: str = "stop-after"
    headline: tuple[str, ...] = ()

    def settings(self) -> dict:
        return {"steps": self.steps}

    def build(self, model: nn.Module, config: TrainConfig, num_examples: int) -> Plugins:
        limit = self.steps

        class Stop(TrainerCallback):
            def on_step_begin(self, trainer) -> None:
                if trainer.step >= limit:
                    trainer.stop(f"stop-after: {limit} steps")

        return Plugins(callbacks=[Stop()])


@pytest.fixture
def toys(request):
    register_method(ToyShift.name, ToyShiftConfig, ToyShift)
    toy_task = Task("toy-sentiment", ("sentence",), 2, ("accuracy",), type=ToyClassification.name)
    register_task_type(ToyClassification(), toy_task)
    request.addfinalizer(lambda: unregister_method(ToyShift.name))
    request.addfinalizer(lambda: unregister_task_type(ToyClassification.name))
    return toy_task


def test_a_toy_method_task_type_and_plugin_registered_from_outside_train_end_to_end(
    tmp_path, toys, toy_files, tiny_model_dirs
):
    assert "toy-shift" in method_names() and get_task("toy-sentiment") is toys
    out = tmp_path / "run"
    report = api.train(
        "toy-sentiment",
        "toy-shift",
        out,
        model=str(tiny_model_dirs["bert"]),
        data=DataSource(
            train_file=str(toy_files / "train.jsonl"), dev_file=str(toy_files / "dev.jsonl")
        ),
        train_config=TrainConfig(max_steps=20, batch_size=16, progress=False, eval_every=0),
        plugins=[StopAfter(6)],
    )
    assert report["steps"] == 6  # the plug-in stopped the run
    assert set(report["metrics"]) == {"accuracy"}  # the task's metrics, by its type
    assert report["trainable_parameters"]["method"] == 32  # the tiny BERT's hidden size
    stored = json.loads((out / CONFIG_FILE).read_text())
    assert stored["task"]["type"] == "toy-classification" and stored["method"] == "toy-shift"
    assert json.loads((out / METRICS_FILE).read_text())["steps"] == 6

    # Saved and reloaded, unmerged and merged: the same logits.
    model, tokenizer, config = load_artifact(out)
    assert type_of(get_task("toy-sentiment")) is model.task_type
    examples = load_examples(get_task("toy-sentiment"), "dev", data_file=toy_files / "dev.jsonl")
    rows, _ = model.task_type.encode(tokenizer, examples, config["max_length"])
    unmerged = predict(model, rows, tokenizer.pad_token_id)
    assert abs(model.method.shift).sum() > 0  # it trained
    merged = predict(model.merge(), rows, tokenizer.pad_token_id)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)


def test_registries_refuse_a_taken_name(toys):
    with pytest.raises(MicrotuneError, match="already registered"):
        register_method(ToyShift.name, ToyShiftConfig, ToyShift)
    with pytest.raises(MicrotuneError, match="already registered"):
        register_task_type(ToyClassification())
    assert "toy-sentiment" in TASKS


# -- the layering ------------------------------------------------------------------------------


def _function_level_imports(path: Path) -> list[str]:
    """`from microtune...` / `import microtune...` statements inside functions of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["(relative)"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n == "microtune" or n.startswith(("microtune.", "(relative)")) for n in names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_module_imports_ours_inside_a_function_but_the_command_line_front():
    front = {"__main__.py", "__init__.py"}
    files = [
        p
        for p in PACKAGE.rglob("*.py")
        if "cli" not in p.relative_to(PACKAGE).parts[:1]
        and str(p.relative_to(PACKAGE)) not in front
    ]
    assert len(files) > 50
    assert [hit for path in files for hit in _function_level_imports(path)] == []


def test_the_command_line_parser_builds_without_torch_or_transformers():
    code = (
        "import sys; from microtune.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'sklearn', 'scipy', 'opacus', 'peft'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- an artifact written before the layering ---------------------------------------------------


def test_an_artifact_from_before_the_layering_predicts_what_it_did(data_dir):
    """The logits were stored on another machine: kernels differ across CPUs (AVX-512 or not)
    in the order they sum, so float32 rounding over six layers moves logits near 1 by a few
    1e-7; 1e-5 bounds that and nothing more. Two runs here must agree bit for bit."""
    expected = json.loads((FIXTURE / "expected_logits.json").read_text())
    model, tokenizer, config = load_artifact(FIXTURE)
    task = get_task(expected["task"])
    dev = load_examples(task, expected["split"], data_dir)[: expected["examples"]]
    rows, labels = type_of(task).encode(tokenizer, dev, config["max_length"])
    assert IGNORE_INDEX not in labels
    logits = predict(model, rows, tokenizer.pad_token_id)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, predict(model, rows, tokenizer.pad_token_id))
    stored = np.asarray(expected["logits"], dtype=np.float32)
    np.testing.assert_allclose(logits, stored, rtol=0, atol=1e-5)


def test_the_public_api_is_the_package_and_imports_nothing_heavy_until_used():
    code = (
        "import sys, microtune; heavy = {'torch', 'transformers'} & set(sys.modules); "
        "names = {n: getattr(microtune, n) for n in microtune.__all__}; "
        "print(sorted(heavy), sorted(names), callable(names['train']), "
        "names['TrainConfig'](max_steps=5).max_steps == 5)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split(" [")[0] == "[]"  # nothing heavy before a name is used
    assert "'load_many'" in done.stdout and done.stdout.strip().endswith("True True")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        microtune.nope  # noqa: B018
