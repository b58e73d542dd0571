"""Task types (issue #9): the seam, labels read from the user's data, token classification.

The method x architecture matrix gains a task-type axis here (every method on a bidirectional
and a causal tiny model, for token classification, regression and own-label classification):
two training steps, a bit-identical artifact round trip and merge parity.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from microtune.api import load_exported
from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint, load_backbone, resolve_model_path
from microtune.cli import main
from microtune.common.choices import DEFAULT_MODEL
from microtune.errors import MicrotuneError
from microtune.export.merged import write_merged
from microtune.methods import METHODS, build_method
from microtune.model import HeadConfig, TaskModel
from microtune.privacy.per_example import PerExampleGradients, loop_gradients
from microtune.tasks.data import IGNORE_INDEX, batches
from microtune.tasks.examples import rows_to_examples, task_record, with_data_labels
from microtune.tasks.heads import default_readout
from microtune.tasks.spec import DataSource, Example, get_task
from microtune.tasks.types import TASK_TYPES, align_labels, type_of
from microtune.tasks.types.tokens import encode_words

from .conftest import WORDS
from .test_method_matrix import ARCH_OPTIONS, TINY_OPTIONS, folds_into_a_bias_no_stock_model_has

pytestmark = pytest.mark.filterwarnings("ignore:bitfit.*no biases:UserWarning")
TAGS = ["B-PER", "I-PER", "O", "B-LOC"]


def tagged_rows(count: int, seed: int = 0) -> list[dict]:
    """Sentences of tiny-vocabulary words: "love"/"hate" start a two-word PER span, "film" is
    a LOC."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=6)]
        tags = []
        for word in words:
            if word in ("love", "hate"):
                tags.append("B-PER")
            elif tags and tags[-1] == "B-PER":
                tags.append("I-PER")
            else:
                tags.append("B-LOC" if word == "film" else "O")
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def sentence_rows(count: int, seed: int = 0, numeric: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = ("neg", "neu", "pos")
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=5)]
        index = int(rng.integers(0, 3))
        rows.append({"text": " ".join(words), "y": float(index) if numeric else names[index]})
    return rows


def task_and_rows(kind: str):
    """(task, training rows, label column) for one task type of the matrix."""
    if kind == "token-classification":
        rows = tagged_rows(8)
        task = with_data_labels(get_task(kind), rows, "rows")
        return task, rows, None
    if kind == "regression":
        return get_task("regression"), sentence_rows(8, numeric=True), "y"
    rows = sentence_rows(8)
    return with_data_labels(get_task("classification"), rows, "rows", "y"), rows, "y"


# -- word-label alignment --------------------------------------------------------------------


def test_alignment_labels_the_first_sub_token_of_each_word():
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [4, 0, 7]) == [
        IGNORE_INDEX,
        4,
        IGNORE_INDEX,
        0,
        7,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]
    assert align_labels([None, None], []) == [IGNORE_INDEX, IGNORE_INDEX]


def test_word_piece_alignment_on_the_packaged_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    examples = [Example(("Peter", "Blackburnshire", "rejects"), (1, 2, 0))]
    rows, labels = encode_words(tokenizer, examples, max_length=32)
    tokens = tokenizer.convert_ids_to_tokens(rows[0]["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    scored = [(t, label) for t, label in zip(tokens, labels[0], strict=True) if label >= 0]
    # One label per word, at its first word piece; the "##" pieces and specials carry -100.
    assert [label for _, label in scored] == [1, 2, 0]
    assert all(not t.startswith("##") for t, _ in scored)
    assert len(tokens) > 5  # Blackburnshire really was split
    # Truncation keeps the alignment of the words that survive.
    rows, labels = encode_words(tokenizer, examples, max_length=4)
    assert len(rows[0]["input_ids"]) == 4 and [x for x in labels[0] if x >= 0] == [1, 2][:2]


def test_padded_token_labels_are_ignored():
    rows = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [2, 3]}]
    rows[1]["attention_mask"] = [1, 1]
    ((_, labels),) = batches(rows, [[-100, 1, -100], [-100, -100]], 2, 0)
    assert labels.tolist() == [[-100, 1, -100], [-100, -100, -100]]


# -- seqeval metrics -------------------------------------------------------------------------


def test_entity_f1_matches_a_hand_computed_example():
    task = get_task("conll2003")
    task = with_data_labels(task, [{"ner_tags": ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]}], "x")
    assert task.label_names == ("O", "B-LOC", "B-ORG", "B-PER", "I-PER")
    index = {name: i for i, name in enumerate(task.label_names)}

    def one_hot(tags, width):  # logits with -100 rows (sub-tokens) in between
        out = np.zeros((width, len(index)), np.float32)
        for position, tag in tags.items():
            out[position, index[tag]] = 5.0
        return out

    # Sentence 1: gold PER (2 words) and LOC; predicted PER right, LOC missed.
    gold1 = [-100, index["B-PER"], -100, index["I-PER"], index["O"], index["B-LOC"], -100]
    pred1 = one_hot({1: "B-PER", 2: "B-LOC", 3: "I-PER", 4: "O", 5: "O"}, 7)
    # Sentence 2: gold ORG; predicted ORG right plus a spurious LOC.
    gold2 = [-100, index["B-ORG"], index["O"], -100]
    pred2 = one_hot({1: "B-ORG", 2: "B-LOC"}, 4)
    scores = TASK_TYPES["token-classification"].score(task, [pred1, pred2], [gold1, gold2])
    # Gold entities {PER, LOC, ORG}, predicted {PER, ORG, LOC'}: 2 of 3 right both ways.
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["f1_PER"] == 1.0 and scores["f1_ORG"] == 1.0 and scores["f1_LOC"] == 0.0


# -- labels read from the data ---------------------------------------------------------------


def test_label_sets_from_the_data_sorted_or_fixed():
    rows = [{"text": "a", "y": v} for v in ("pos", "neg", "neu", "neg")]
    assert with_data_labels(get_task("classification"), rows, "f", "y").label_names == (
        "neg",
        "neu",
        "pos",
    )
    fixed = with_data_labels(get_task("classification"), rows, "f", "y", ("pos", "neu", "neg"))
    assert fixed.label_names == ("pos", "neu", "neg") and fixed.num_labels == 3
    numbers = [{"text": "a", "y": v} for v in (10, 2, "3", 2.0)]
    task = with_data_labels(get_task("classification"), numbers, "f", "y")
    assert task.label_names == ("2", "3", "10")
    examples = rows_to_examples(task, numbers, "f", ("text",), "y")
    assert [e.label for e in examples] == [2, 0, 1, 0]
    with pytest.raises(MicrotuneError, match="label 'bad' is not one of the training labels"):
        rows_to_examples(fixed, [{"text": "a", "y": "bad"}], "dev.csv", ("text",), "y")
    with pytest.raises(MicrotuneError, match="are not in --labels"):
        with_data_labels(get_task("classification"), rows, "f", "y", ("pos", "neg"))
    with pytest.raises(MicrotuneError, match="needs two or more"):
        with_data_labels(get_task("classification"), rows[:1], "f", "y")
    tags = with_data_labels(get_task("token-classification"), tagged_rows(20), "f")
    assert tags.label_names[0] == "O" and list(tags.label_names[1:]) == sorted(tags.label_names[1:])


def test_conll2003_tiny_run_on_the_shared_ner_folder(data_dir, tiny_model_dirs, tmp_path):
    """The tiny version of `bench/conll_ner.py` (the real run: MiniLM, 2,000 sentences)."""
    from microtune.api import train
    from microtune.training.config import TrainConfig

    report = train(
        "conll2003",
        "slash",
        tmp_path,
        method_options={"d": 8},
        model=str(tiny_model_dirs["bert"]),
        data=DataSource(data_dir=str(data_dir), max_train_examples=64),
        train_config=TrainConfig(max_steps=2, batch_size=16, eval_every=0, progress=False),
    )
    assert report["steps"] == 2 and 0 <= report["metrics"]["f1"] <= 1
    config = json.loads((tmp_path / "microtune.json").read_text())
    names = config["task"]["label_names"]
    assert names[0] == "O" and len(names) == 9 and config["head"]["readout"] == "tokens"


# -- the method x architecture x task-type matrix --------------------------------------------

KINDS = ("token-classification", "regression", "classification")


def build(method_name: str, folder, task):
    backbone, tokenizer = load_backbone(str(folder))
    base_fingerprint = fingerprint(backbone)  # before attaching, as api.train does
    torch.manual_seed(0)
    options = {
        **TINY_OPTIONS.get(method_name, {}),
        **ARCH_OPTIONS.get((method_name, backbone.config.model_type), {}),
    }
    kind = type_of(task)
    head = HeadConfig(
        task.num_labels, kind.readout(None, default_readout(arch_for(backbone).causal))
    )
    model = TaskModel(
        backbone, head, build_method(method_name, options), tokenizer.mask_token_id, task_type=kind
    )
    return model, tokenizer, base_fingerprint


def outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_type", ("bert", "llama"))
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_task_type_matrix(method_name, model_type, kind, tiny_model_dirs, tmp_path):
    task, rows, label_column = task_and_rows(kind)
    folder = tiny_model_dirs[model_type]
    model, tokenizer, base_fingerprint = build(method_name, folder, task)
    examples = rows_to_examples(task, rows, "rows", None, label_column)
    encoded, labels = type_of(task).encode(tokenizer, examples, 32)
    ((inputs, target),) = batches(encoded, labels, len(encoded), tokenizer.pad_token_id)
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids" or model_type == "bert"}

    trainable = model.trainable_state()
    optimizer = torch.optim.AdamW(trainable.values(), lr=5e-2)
    before = outputs(model, inputs)
    expected_shape = (len(rows), inputs["input_ids"].shape[1]) if kind == KINDS[0] else (8,)
    assert before.shape == (*expected_shape, task.num_labels)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = model.loss(model(**inputs), target)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert model.loss(model(**inputs), target, reduction="none").shape == (8,)
    trained = outputs(model, inputs)
    assert not torch.equal(trained, before)

    save_artifact(
        tmp_path,
        model,
        method_name=method_name,
        base_model=str(folder),
        base_fingerprint=base_fingerprint,
        task=task_record(task, None, label_column),
        max_length=32,
    )
    reloaded, _, config = load_artifact(tmp_path)
    assert config["task"]["type"] == kind and reloaded.task_type.name == kind
    assert config["task"]["label_names"] == list(task.label_names)
    assert torch.equal(outputs(reloaded, inputs), trained)

    if not METHODS[method_name].mergeable or folds_into_a_bias_no_stock_model_has(reloaded):
        return  # the refusals are test_method_matrix.py's
    reloaded.merge()
    assert (outputs(reloaded, inputs) - trained).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ("bert", "llama"))
def test_token_export_is_a_stock_token_classification_model(model_type, tiny_model_dirs, tmp_path):
    task, rows, _ = task_and_rows("token-classification")
    model, tokenizer, _ = build("lora", tiny_model_dirs[model_type], task)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.1)
    examples = rows_to_examples(task, rows, "rows")
    encoded, _ = type_of(task).encode(tokenizer, examples, 32)
    ((inputs, _),) = batches(encoded, [0] * len(encoded), 8, tokenizer.pad_token_id)
    inputs.pop("token_type_ids", None)
    expected = outputs(model, inputs)
    config = {
        "task": task_record(task),
        "method": "lora",
        "base_model": {"name": str(tiny_model_dirs[model_type])},
    }
    assert write_merged(model, tokenizer, config, tmp_path) == "token-classification"
    stock = AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    assert stock.config.id2label[0] == "O"
    with torch.no_grad():
        got = stock(**inputs).logits
    assert (got - expected).abs().max() <= 1e-4
    forward, _ = load_exported(tmp_path)
    with torch.no_grad():
        assert torch.equal(forward(**inputs), got)


@pytest.mark.parametrize("method_name", ["slash", "lora"])  # substitution and vmap paths
def test_token_classification_per_example_gradients(method_name, tiny_model_dirs):
    task, rows, _ = task_and_rows("token-classification")
    model, tokenizer, _ = build(method_name, tiny_model_dirs["bert"], task)
    model.eval()
    examples = rows_to_examples(task, rows[:3], "rows")
    encoded, labels = type_of(task).encode(tokenizer, examples, 32)
    ((inputs, target),) = batches(encoded, labels, 3, tokenizer.pad_token_id)
    parameters = model.trainable_state()
    engine = PerExampleGradients(model, parameters)
    assert engine.path == ("substitution" if method_name == "slash" else "vmap")
    losses, grads = next(iter(engine(inputs, target)))
    # Reference: one unpadded example at a time.
    for i, row in enumerate(encoded):
        one = {k: torch.tensor([v]) for k, v in row.items()}
        loss, ref = loop_gradients(model, parameters, one, torch.tensor([labels[i]]))
        assert torch.allclose(losses[i], loss[0], atol=1e-5)
        for name in parameters:
            assert torch.allclose(grads[name][i], ref[name][0], atol=1e-5), name


# -- the command line, end to end ------------------------------------------------------------


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "y"])
        writer.writeheader()
        writer.writerows(rows)


def test_own_string_labels_through_the_cli(tiny_model_dirs, tmp_path, capsys):
    write_csv(tmp_path / "train.csv", sentence_rows(24, seed=1))
    write_csv(tmp_path / "dev.csv", sentence_rows(9, seed=2))
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dirs["bert"]), "--text-columns", "text"]
    argv = [
        "train", "--task", "classification", "--train-file", str(tmp_path / "train.csv"),
        "--dev-file", str(tmp_path / "dev.csv"), "--label-column", "y", "--output", str(out),
        "--max-steps", "2", "--batch-size", "8", "--no-progress", "--method", "lora",
        *common,
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["metrics"]) == {"accuracy", "macro_f1"}
    config = json.loads((out / "microtune.json").read_text())
    assert config["task"]["label_names"] == ["neg", "neu", "pos"]
    assert config["task"]["type"] == "classification"

    assert main(["eval", "--artifact", str(out)]) == 2  # no file: own tasks name their data
    capsys.readouterr()
    for flag in ("--data-file", "--dev-file"):  # --dev-file: the name train took it by
        assert main(["eval", "--artifact", str(out), flag, str(tmp_path / "dev.csv")]) == 0
        result = json.loads(capsys.readouterr().out)
        assert {name: result[name] for name in report["metrics"]} == report["metrics"]
        assert set(result["per_class"]) == {"neg", "neu", "pos"}  # by the file's label names

    (tmp_path / "in.txt").write_text("the film is good\nawful plot\n")
    assert main(["predict", "--artifact", str(out), "--input", str(tmp_path / "in.txt")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(r["label"] in ("neg", "neu", "pos") for r in lines)

    # A dev label outside the training set: one line, before any training.
    write_csv(tmp_path / "bad.csv", [{"text": "the film", "y": "meh"}])
    argv[argv.index(str(tmp_path / "dev.csv"))] = str(tmp_path / "bad.csv")
    argv[argv.index(str(out))] = str(tmp_path / "run2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "label 'meh' is not one of the training labels" in err


def test_token_classification_through_the_cli(tiny_model_dirs, tmp_path, capsys):
    for split, count in (("train", 24), ("dev", 6)):
        rows = tagged_rows(count, seed=len(split))
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [
        "train", "--task", "token-classification", "--train-file", str(tmp_path / "train.jsonl"),
        "--dev-file", str(tmp_path / "dev.jsonl"), "--output", str(out), "--max-steps", "2",
        "--batch-size", "8", "--no-progress", "--model", str(tiny_model_dirs["bert"]),
        "--dp-sigma", "0.5", "--dp-batch", "8", "--dp-noise-seed", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"f1", "precision", "recall"} <= set(report["metrics"]) and report["epsilon"] > 0
    (tmp_path / "in.txt").write_text('love it , the film\n{"tokens": ["hate", "a"]}\n')
    assert main(["predict", "--artifact", str(out), "--input", str(tmp_path / "in.txt")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["tokens"] == ["love", "it", ",", "the", "film"]
    assert len(lines[0]["tags"]) == 5 and len(lines[1]["tags"]) == 2
    names = set(json.loads((out / "microtune.json").read_text())["task"]["label_names"])
    assert set(lines[0]["tags"]) <= names
