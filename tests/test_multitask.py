"""Mixed-task batches on one base model (`microtune.load_many`): every row equals its own task's
merged model (or unmerged artifact), on artifacts really trained on tiny models."""

import dataclasses
import json
import random

import pytest
import torch
from torch import nn

import microtune
from microtune import api
from microtune.backbone.archspec import get_submodule
from microtune.backbone.options import ModelOptions
from microtune.errors import MicrotuneError
from microtune.methods import register_method, unregister_method
from microtune.methods.base import Method
from microtune.methods.configs.base import MethodConfig
from microtune.serving.multitask import load_many
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig

from .conftest import WORDS, make_tiny_model
from .test_causal_lm import copy_rows, make_causal_model, write_jsonl
from .test_task_types import tagged_rows

TEXTS = ["the film is good", "a very dull plot , not fun", "love it", "the worst movie", "fun"]
# name: (task, method, options); two LoRA ranks and two PaFi tasks on one mask.
SPECS = {
    "slash": ("sst2", "slash", {}),
    "slash-output": ("sst2", "slash", {"position": "output"}),
    "slash-intermediate": ("sst2", "slash", {"position": "intermediate"}),
    "bitfit": ("sst2", "bitfit", {}),
    "hiwi": ("sst2", "hiwi", {"activation": "gelu"}),
    "linear": ("sst2", "linear", {}),
    "lora-4": ("sst2", "lora", {"rank": 4}),
    "lora-2": ("sst2", "lora", {"rank": 2, "target_modules": "query,value,dense"}),
    "pafi-a": ("sst2", "pafi", {"k": 64}),
    "pafi-b": ("sst2", "pafi", {"k": 64}),
    "stsb-slash": ("regression", "slash", {}),
    "ner-slash": ("token-classification", "slash", {}),
    "ner-lora": ("token-classification", "lora", {}),
}


def write_rows(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:48]), ("dev", rows[48:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def task_files(root, task):
    rng = random.Random(len(task))
    if task == "token-classification":
        return write_rows(root / task, tagged_rows(64))
    rows = []
    for _ in range(64):
        words = rng.sample(WORDS, 5)
        score = sum(w in ("good", "great", "fun", "love", "best") for w in words)
        rows.append({"sentence": " ".join(words), "label": float(score) if task == "regression"
                     else int(score > 0)})  # fmt: skip
    return write_rows(root / task, rows)


def train(root, model_dir, name, task, method, options, seed=0):
    files = task_files(root / "data", task)
    api.train(
        task,
        method,
        root / name,
        method_options=options,
        model=ModelOptions(name=str(model_dir), device="cpu", max_length=32),
        data=DataSource(
            train_file=str(files / "train.jsonl"),
            dev_file=str(files / "dev.jsonl"),
            text_columns=("sentence",) if task == "regression" else None,
        ),
        train_config=TrainConfig(
            max_steps=8, batch_size=8, eval_every=0, progress=False, seed=seed, learning_rate=0.05
        ),
    )
    return root / name


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("multitask")
    model_dir = tiny_model_dirs["bert"]
    return {
        name: train(root, model_dir, name, task, method, options, seed)
        for seed, (name, (task, method, options)) in enumerate(SPECS.items())
    }


@pytest.fixture(scope="module")
def engine(artifacts):
    return load_many(artifacts)


def inputs_of(name, i):
    if name.startswith("ner"):
        return [TEXTS[i % 5], TEXTS[(i + 2) % 5].split()]
    return [TEXTS[i % 5], TEXTS[(i + 3) % 5]]


def reference(folder, inputs):
    """The task alone: merged where it merges, else the unmerged artifact."""
    alone = microtune.load(folder)
    unmerged = alone.logits(inputs)
    alone.merge()
    return alone.logits(inputs), unmerged


def test_every_row_of_a_mixed_batch_equals_its_own_merged_task(engine, artifacts):
    requests = [(name, inputs_of(name, i)) for i, name in enumerate(artifacts)]
    outputs = engine.logits(requests)  # one mixed batch: every task's rows together
    for (name, inputs), got in zip(requests, outputs, strict=True):
        merged, unmerged = reference(artifacts[name], inputs)
        if isinstance(merged, list):  # per token: one (tokens, tags) array per input
            for row, want in zip(got, merged, strict=True):
                assert torch.allclose(torch.from_numpy(row), want, atol=1e-5), name
        else:
            assert torch.allclose(torch.from_numpy(got), merged, atol=1e-5), name
            assert torch.allclose(torch.from_numpy(got), unmerged, atol=1e-5), name
    kinds = {name: task.kind for name, task in engine.tasks.items()}
    assert kinds["slash"] == kinds["bitfit"] == kinds["hiwi"] == kinds["linear"] == "bias"
    assert kinds["lora-4"] == "lora" and kinds["pafi-a"] == "pafi"


def test_the_tasks_really_differ_from_the_base(engine):
    """Trained updates are there to get wrong: bias rows at every block, factors, values."""
    sites = {name: task.sites for name, task in engine.tasks.items()}
    assert len(sites["slash"]) == len(sites["slash-output"]) == 2  # one per block
    assert len(sites["bitfit"]) > len(sites["slash"]) and len(sites["hiwi"]) == 4
    assert sites["linear"] == () and len(sites["lora-2"]) > len(sites["lora-4"])
    swap = engine.tasks["pafi-a"].swap
    (values,), (positions, original) = swap.own, swap.shared
    assert not torch.equal(values, original.float())
    # The two PaFi tasks share one mask: positions and original values are held once.
    assert engine.tasks["pafi-b"].swap.shared[0] is positions


def test_the_shared_base_is_left_exactly_as_loaded(engine, artifacts, tiny_model_dirs):
    engine.logits([(name, inputs_of(name, 0)) for name in artifacts])
    fresh = microtune.load(artifacts["linear"]).task_model.backbone.state_dict()
    for name, tensor in engine.base.model.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name


def test_predict_gives_each_request_its_own_labels(engine):
    results = engine.predict(
        [("slash", ["love it"]), ("stsb-slash", ["dull"]), ("ner-slash", [["love", "it"]])]
    )
    assert results[0][0]["label"] in ("negative", "positive")
    assert results[1][0]["label"] is None and isinstance(results[1][0]["score"], float)
    assert results[2][0]["tokens"] == ["love", "it"] and len(results[2][0]["tags"]) == 2


def test_bias_tasks_hold_a_few_rows_not_a_model(engine):
    for name in ("slash", "slash-output", "bitfit", "hiwi", "linear"):
        task = engine.tasks[name]
        assert task.resident_bytes <= 2 * task.artifact_bytes, name
    # Heads are rows of stacked tables; tasks of one task record share one view (its model
    # and config), so a task holds no module of its own.
    light = [task for task in engine.tasks.values() if task.head_key is not None]
    assert {"slash", "bitfit", "lora-4"} <= {task.name for task in light}
    assert len({id(task.tuned) for task in light}) < len(light)


def test_remove_drops_one_task_and_leaves_the_others_exact(artifacts):
    engine = load_many({k: artifacts[k] for k in ("slash", "bitfit", "lora-4", "lora-2")})
    engine.remove("bitfit")
    engine.remove("lora-4")
    with pytest.raises(MicrotuneError, match="unknown task 'bitfit'"):
        engine.logits([("bitfit", ["fun"])])
    outputs = engine.logits([("slash", TEXTS), ("lora-2", TEXTS)])
    for name, got in zip(("slash", "lora-2"), outputs, strict=True):
        assert torch.allclose(
            torch.from_numpy(got), reference(artifacts[name], TEXTS)[0], atol=1e-5
        )
    engine.add(artifacts["bitfit"])  # back again, under its folder's name
    got = engine.logits([("bitfit", TEXTS)])[0]
    assert torch.allclose(
        torch.from_numpy(got), reference(artifacts["bitfit"], TEXTS)[0], atol=1e-5
    )


def test_a_method_that_cannot_join_is_refused_or_copied_within_the_cap(
    tmp_path, artifacts, tiny_model_dirs
):
    warp = train(tmp_path, tiny_model_dirs["bert"], "warp", "sst2", "warp", {})
    with pytest.raises(MicrotuneError) as refused:
        load_many({"slash": artifacts["slash"], "warp": warp})
    message = str(refused.value)
    assert "\n" not in message and "max_copy_bytes=0" in message and "--max-copy-mb" in message
    engine = load_many({"slash": artifacts["slash"], "warp": warp}, max_copy_bytes=50 * 2**20)
    assert engine.tasks["warp"].kind == "copy"
    got = engine.logits([("warp", TEXTS), ("slash", TEXTS)])
    assert torch.allclose(torch.from_numpy(got[0]), microtune.load(warp).logits(TEXTS), atol=1e-5)


@dataclasses.dataclass
class ToyBiasConfig(MethodConfig):
    """A toy method's options."""

    layer: int = dataclasses.field(default=-1, metadata={"help": "the block whose FFN shifts"})


class ToyBias(Method):
    """A method from outside the package: one trainable vector added to one block's FFN output,
    merged into that layer's bias; it declares that it joins mixed batches as bias rows."""

    name = "toy-bias"
    config_class = ToyBiasConfig
    default_learning_rate = 5e-2
    mixed_batch = "bias"

    def attach(self, backbone: nn.Module, arch) -> None:
        self.shift = nn.Parameter(torch.zeros(backbone.config.hidden_size))
        block = get_submodule(backbone, arch.blocks)[self.config.layer]
        self.sites = [get_submodule(block, arch.ffn_out)]  # a list: not a submodule of ours
        self._hooks.append(
            self.sites[0].register_forward_hook(lambda module, args, out: out + self.shift)
        )

    def merge(self, backbone: nn.Module, arch) -> list[str]:
        with torch.no_grad():
            self.sites[0].bias += self.shift.to(self.sites[0].bias.dtype)
        self.detach()
        return []


@pytest.fixture
def toy_bias(request):
    register_method(ToyBias.name, ToyBiasConfig, ToyBias)
    request.addfinalizer(lambda: unregister_method(ToyBias.name))


def test_a_method_registered_from_outside_joins_a_mixed_batch(
    tmp_path, artifacts, tiny_model_dirs, toy_bias
):
    """Serving is the method's own declaration: no file of the package names the toy."""
    folders = {
        "toy": train(tmp_path, tiny_model_dirs["bert"], "toy", "sst2", "toy-bias", {}),
        "slash": artifacts["slash"],
    }
    engine = load_many(folders)
    assert engine.tasks["toy"].kind == "bias" and len(engine.tasks["toy"].sites) == 1
    requests = [("toy", TEXTS), ("slash", TEXTS[::-1]), ("toy", TEXTS[1:3])]
    outputs = engine.logits(requests)  # one mixed batch: both tasks' rows together
    for (name, inputs), got in zip(requests, outputs, strict=True):
        alone = microtune.load(folders[name]).logits(inputs)
        assert torch.allclose(torch.from_numpy(got), alone, atol=1e-5), name
    base = microtune.load(folders["toy"])
    base.task_model.method.detach()  # the toy's update gone: the base and its head
    assert not torch.allclose(torch.from_numpy(outputs[0]), base.logits(TEXTS), atol=1e-5)


def test_an_artifact_of_another_base_is_refused(tmp_path, artifacts):
    other = make_tiny_model("bert", tmp_path / "other-bert", seed=1)
    foreign = train(tmp_path, other, "foreign", "sst2", "linear", {})
    engine = load_many({"slash": artifacts["slash"]})
    with pytest.raises(MicrotuneError, match="base model mismatch"):
        engine.add(foreign)
    assert list(engine.tasks) == ["slash"]


def test_a_causal_lm_task_beside_classifiers_on_the_same_base_is_no_base_mismatch(tmp_path):
    """A causal-lm artifact reads the whole causal LM (its LM head too), a classifier on the same
    weights its body alone: on one loaded base they cannot share, in either order, and the
    refusal says so (a server or load_many of its own) instead of a base-model mismatch whose
    advice, --model, cannot help."""
    base = make_causal_model("gpt2", tmp_path / "gpt2", tie=True)
    classifier = train(tmp_path, base, "sst2", "sst2", "slash", {})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", copy_rows(16, 1))
    api.train(
        "causal-lm",
        "slash",
        tmp_path / "gen",
        model=ModelOptions(name=str(base), device="cpu", max_length=32),
        data=DataSource(train_file=pairs, dev_file=pairs),
        train_config=TrainConfig(max_steps=2, batch_size=8, eval_every=0, progress=False),
    )
    for first, second in ((classifier, tmp_path / "gen"), (tmp_path / "gen", classifier)):
        engine = load_many([first])
        with pytest.raises(MicrotuneError) as refused:
            engine.add(second)
        message = str(refused.value)
        assert "mismatch" not in message and "--model with" not in message, message
        assert "reads the base model through" in message and "of its own" in message, message
        assert "\n" not in message and list(engine.tasks) == [first.name]
        assert engine.tasks[first.name].tuned  # the loaded task still serves


def test_causal_lm_tasks_generate_their_own_continuations(tmp_path):
    base = make_causal_model("gpt2", tmp_path / "gpt2", tie=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", copy_rows(24, 1))
    dev_file = write_jsonl(tmp_path / "dev.jsonl", copy_rows(6, 2))
    folders = {}
    for seed, method in enumerate(("slash", "lora", "pafi")):
        folders[method] = tmp_path / method
        api.train(
            "causal-lm",
            method,
            folders[method],
            method_options={"k": 64} if method == "pafi" else {},
            model=ModelOptions(name=str(base), device="cpu", max_length=32),
            data=DataSource(train_file=train_file, dev_file=dev_file),
            train_config=TrainConfig(
                max_steps=6,
                batch_size=8,
                eval_every=0,
                progress=False,
                seed=seed,
                learning_rate=0.05,
            ),
        )
    engine = load_many(folders)
    prompts = ["the film is", "a very dull plot , not", "love"]
    answers = {}
    for name, folder in folders.items():
        answers[name] = engine.generate(name, prompts, max_new_tokens=6)
        assert answers[name] == microtune.load(folder).generate(prompts, max_new_tokens=6), name
    with pytest.raises(MicrotuneError):
        engine.predict([("slash", ["the film"])])  # a causal LM generates instead


def test_load_many_takes_any_iterable_of_folders_but_not_one_path(artifacts):
    folders = [artifacts["slash"], artifacts["lora-4"]]
    engine = load_many(folder for folder in folders)  # a generator
    assert set(engine.tasks) == {"slash", "lora-4"}
    for one in (str(folders[0]), folders[0]):
        with pytest.raises(MicrotuneError, match="not one path") as refused:
            load_many(one)
        assert "\n" not in str(refused.value) and "pass [" in str(refused.value)


@pytest.mark.parametrize(
    "requests",
    ["slash", None, {"slash": ["a"]}, [("slash",)], [("slash", ["a"], 1)], [("slash", 5)]],
)
def test_a_malformed_request_is_one_line_not_a_raw_error(engine, requests):
    for call in (engine.predict, engine.logits):
        with pytest.raises(MicrotuneError, match="must be") as refused:
            call(requests)
        assert "\n" not in str(refused.value)
