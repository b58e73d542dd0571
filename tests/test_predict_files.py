"""`microtune predict --input`: a CSV, TSV, JSON or JSONL file is read as `train` reads it (a
header is a header, each row one input, its text columns by --text-columns); a .txt file or
standard input stays one text per line."""

import csv
import io
import json

import pytest

import microtune
from microtune import cli
from microtune.errors import MicrotuneError

from .test_serving import PAIRS, TEXTS, make_artifact


@pytest.fixture(scope="module")
def sst2(tmp_path_factory, tiny_model_dirs):
    return make_artifact(tmp_path_factory.mktemp("sst2"), tiny_model_dirs["bert"])


def predict(artifact, path, *extra):
    return cli.run(["predict", "--artifact", str(artifact), "--input", str(path), *extra])


def table(header, rows, sep=","):
    out = io.StringIO()
    csv.writer(out, delimiter=sep, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def test_a_csv_or_tsv_input_is_rows_under_a_header_not_lines(sst2, tmp_path):
    expected = microtune.load(sst2).predict(TEXTS)
    labels = ["pos", "neg", "pos", "neg"]
    for suffix, sep in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"my{suffix}"
        path.write_text(table(["sentence", "label"], zip(TEXTS, labels, strict=True), sep))
        assert predict(sst2, path) == expected  # no header row, no label in the text
        path.write_text(table(["text", "label"], zip(TEXTS, labels, strict=True), sep))
        assert predict(sst2, path, "--text-columns", "text") == expected
        with pytest.raises(MicrotuneError, match=r"row 1: no column\(s\) \['sentence'\].*--text"):
            predict(sst2, path)


def test_a_jsonl_input_maps_its_columns_and_a_txt_input_stays_lines(sst2, tmp_path):
    expected = microtune.load(sst2).predict(TEXTS)
    path = tmp_path / "my.jsonl"
    path.write_text("".join(json.dumps({"review": t, "label": 1}) + "\n" for t in TEXTS))
    assert predict(sst2, path, "--text-columns", "review") == expected
    with pytest.raises(MicrotuneError, match="reads 1 text column"):
        predict(sst2, path, "--text-columns", "review,label")
    lines = tmp_path / "my.txt"
    lines.write_text("sentence,label\n" + "\n".join(TEXTS) + "\n")
    assert len(predict(sst2, lines)) == 5  # a text file is one text per line, whatever it holds
    with pytest.raises(MicrotuneError, match="--text-columns names the columns of a .csv"):
        predict(sst2, lines, "--text-columns", "review")


def test_a_pair_task_reads_two_columns_of_a_csv(tmp_path, tiny_model_dirs):
    artifact = make_artifact(tmp_path / "rte", tiny_model_dirs["bert"], task="rte")
    path = tmp_path / "pairs.csv"
    path.write_text(table(["premise", "hypothesis"], PAIRS))
    found = predict(artifact, path, "--text-columns", "premise,hypothesis")
    assert found == microtune.load(artifact).predict(PAIRS)
