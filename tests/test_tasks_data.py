"""Tasks, data loading from every source, tokenisation and metrics."""

import json

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from microtune.errors import MicrotuneError
from microtune.tasks.data import batches, encode, epoch_order
from microtune.tasks.examples import load_examples
from microtune.tasks.metrics import compute_metrics
from microtune.tasks.spec import TASKS, Example, get_task

from .conftest import tiny_tokenizer

GLUE = ("sst2", "cola", "mrpc", "rte", "stsb", "qnli", "qqp", "mnli")


def test_registry_has_the_eight_glue_tasks():
    assert set(GLUE) <= set(TASKS)
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3 and get_task("mnli").dev_split == "validation_matched"
    assert get_task("cola").main_metric == "matthews_correlation"
    assert get_task("mrpc").metrics == ("f1", "accuracy")
    with pytest.raises(MicrotuneError, match="task 'sst-2' is unknown; available: sst2"):
        get_task("sst-2")


@pytest.mark.parametrize(
    "name,train,dev",
    [("sst2", 67349, 872), ("rte", 2490, 277), ("stsb", 5749, 1500), ("mrpc", 3668, 408)],
)
def test_reads_the_shared_data_folder(name, train, dev, data_dir):
    task = get_task(name)
    assert len(load_examples(task, "train", data_dir)) == train
    examples = load_examples(task, task.dev_split, data_dir)
    assert len(examples) == dev
    assert len(examples[0].texts) == len(task.text_columns)
    assert isinstance(examples[0].label, float if task.is_regression else int)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_user_files_with_a_column_mapping(suffix, tmp_path):
    rows = [
        {"premise": "a cat", "claim": "an animal", "gold": "entailment"},
        {"premise": "a dog", "claim": "a car", "gold": "not_entailment"},
    ]
    path = tmp_path / f"mine{suffix}"
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(
            f"premise{sep}claim{sep}gold\n"
            + "".join(f"{r['premise']}{sep}{r['claim']}{sep}{r['gold']}\n" for r in rows)
        )
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(
        get_task("rte"),
        "train",
        data_file=path,
        text_columns=("premise", "claim"),
        label_column="gold",
    )
    assert examples == [Example(("a cat", "an animal"), 0), Example(("a dog", "a car"), 1)]


def test_bad_files_give_one_line_errors(tmp_path):
    task = get_task("sst2")
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "hi", "label": 1}) + "\n")
    with pytest.raises(MicrotuneError, match=r"missing column\(s\) \['sentence'\].*--text-col"):
        load_examples(task, "train", data_file=path)
    path.write_text(json.dumps({"sentence": "hi", "label": -1}) + "\n")
    with pytest.raises(MicrotuneError, match="label -1 is outside 0..1"):
        load_examples(task, "train", data_file=path)
    with pytest.raises(MicrotuneError, match="no 'train' split for sst2"):
        load_examples(task, "train", data_dir=tmp_path)
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(MicrotuneError, match="unsupported type '.xml'"):
        load_examples(task, "train", data_file=tmp_path / "a.xml")


def test_offline_without_data_dir_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MicrotuneError, match="pass --data-dir"):
        load_examples(get_task("sst2"), "train")


def test_mask_token_ends_the_first_sentence_even_after_truncation():
    tokenizer = tiny_tokenizer()
    long_first = " ".join(["good"] * 40)
    examples = [Example((long_first, "bad plot"), 0), Example(("fun", "dull"), 1)]
    rows = encode(tokenizer, examples, max_length=16, add_mask_token=True)
    mask, sep = tokenizer.mask_token_id, tokenizer.sep_token_id
    for row in rows:
        ids = row["input_ids"]
        assert len(ids) <= 16
        assert ids.count(mask) == 1 and ids[ids.index(mask) + 1] == sep
        assert len(ids) == len(row["attention_mask"]) == len(row["token_type_ids"])
        assert row["token_type_ids"][ids.index(mask)] == 0
    assert rows[1]["input_ids"][:4] == tokenizer("fun")["input_ids"][:2] + [mask, sep]


def test_batches_pad_right_and_epoch_order_is_a_seeded_permutation():
    tokenizer = tiny_tokenizer()
    rows = encode(tokenizer, [Example(("good",), 1), Example(("a very dull plot",), 0)], 32)
    ((inputs, labels),) = list(batches(rows, [1, 0], 8, tokenizer.pad_token_id))
    assert inputs["input_ids"].shape == (2, 6)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert inputs["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 3
    assert labels.tolist() == [1, 0]
    order = epoch_order(100, seed=1, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=1, epoch=0) != epoch_order(100, seed=1, epoch=1)


def test_metrics_match_their_definitions():
    labels = np.array([0, 1, 1, 0, 1, 1])
    predictions = np.array([0, 1, 0, 0, 1, 1])
    metrics = compute_metrics(("accuracy", "f1", "matthews_correlation"), predictions, labels)
    tp, fp, fn, tn = 3, 0, 1, 2
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics["matthews_correlation"] == pytest.approx(mcc)
    scores = np.array([0.1, 2.0, 3.5, 4.9]), np.array([0.0, 2.5, 3.0, 5.0])
    regression = compute_metrics(("pearson", "spearman"), *scores)
    assert regression["pearson"] == pytest.approx(pearsonr(*scores)[0])
    assert regression["spearman"] == pytest.approx(spearmanr(*scores)[0]) == 1.0


def test_a_bad_row_anywhere_names_its_row(tmp_path):
    good = json.dumps({"sentence": "fine", "label": 1})
    path = tmp_path / "rows.jsonl"
    path.write_text(good + "\n" + json.dumps({"sentence": "no label"}) + "\n")
    with pytest.raises(MicrotuneError, match=r"row 2: missing column\(s\) \['label'\]"):
        load_examples(get_task("sst2"), "train", data_file=path)
    path.write_text(good + '\n{"sentence": "torn\n')
    with pytest.raises(MicrotuneError, match="line 2: not valid JSON"):
        load_examples(get_task("sst2"), "train", data_file=path)
    path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": "n/a"}) + "\n")
    with pytest.raises(MicrotuneError, match="label 'n/a' is not a number"):
        load_examples(get_task("stsb"), "train", data_file=path)


def test_offline_switch_accepts_the_hubs_true_values(monkeypatch):
    from microtune.common.hub import is_offline

    for value, expected in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert is_offline() is expected
