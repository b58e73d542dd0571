"""Every export format of each artifact against the unmerged artifact on dev rows (issue #21).

For each --artifact: `export` (merged: stock class, sentence-transformers or backbone + head),
`export --format onnx` and `--format onnx --quantize int8`, each with its built-in check; then
each folder loaded by the library its record names, on the first --rows dev inputs as texts:
`pipeline()` (text- or token-classification) where it loads, else whether it refused loudly;
`SentenceTransformer.encode` for a sentence-transformers folder; and `microtune.load(folder)`
(`predict --model-folder`) for every format. Prints one JSON row per (artifact, format):
max |logit difference| on dev rows (the export check's) and the share of dev rows whose label
matches `microtune predict --artifact`.

    python bench/export_parity.py --artifact runs/sst2 --artifact runs/ner --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import tempfile
from pathlib import Path

import torch
from transformers import pipeline

import microtune
from microtune.api import export_and_check
from microtune.artifacts.store import read_artifact_config
from microtune.tasks.examples import load_split, task_from_record

FORMATS = {"merged": {}, "onnx": {"onnx": True}, "onnx-int8": {"onnx": True, "quantize": "int8"}}


def same(x, y) -> bool:
    """Equal labels or tags; regression scores within 1e-3."""
    return abs(x - y) <= 1e-3 if isinstance(x, float) else x == y


def share(a: list, b: list) -> float:
    return round(sum(same(x, y) for x, y in zip(a, b, strict=True)) / max(1, len(a)), 4)


def labels_of(predictions: list[dict]) -> list:
    """Labels (sentence tasks), rounded scores (regression), or tags per word (tokens)."""
    if predictions and "tags" in predictions[0]:
        return [p["tags"] for p in predictions]
    if predictions and predictions[0]["label"] is None:
        return [p["score"] for p in predictions]
    return [p["label"] for p in predictions]


def pipeline_labels(folder: Path, kind: str, inputs: list, per_token: bool) -> list | str:
    """What `pipeline()` predicts for the inputs, or how it refused."""
    task = "token-classification" if per_token else "text-classification"
    try:
        run = pipeline(task, model=str(folder), device="cpu")
    except (OSError, ValueError) as error:
        return f"refused loudly: {type(error).__name__}"
    if per_token:  # the first sub-token of each word, as microtune tags words
        out = run([" ".join(words) for words in inputs], ignore_labels=[])
        return [first_per_word(words, row) for words, row in zip(inputs, out, strict=True)]
    if kind == "regression":
        return [r["score"] for r in run(inputs, function_to_apply="none")]
    return [r["label"] for r in run(inputs)]


def first_per_word(words: list[str], entries: list[dict]) -> list:
    """The pipeline's tag of each word's first sub-token, found by character offsets in the
    words joined by spaces (None for a word it did not tag, e.g. cut by max_length)."""
    starts = list(itertools.accumulate([0] + [len(w) + 1 for w in words[:-1]]))
    tags: list = [None] * len(words)
    for entry in entries:
        index = bisect.bisect_right(starts, entry["start"]) - 1
        if tags[index] is None:
            tags[index] = entry["entity"]
    return tags


def texts_of(examples, per_token: bool) -> list:
    if per_token:
        return [list(e.texts) for e in examples]
    return [e.texts[0] if len(e.texts) == 1 else {"text": e.texts[0], "text_pair": e.texts[1]}
            for e in examples]  # fmt: skip


def check_artifact(artifact: str, data_dir: str, rows: int, scratch: Path) -> list[dict]:
    config = read_artifact_config(artifact)
    task = task_from_record(config["task"])
    examples = load_split(task, task.dev_split, data_dir, limit=rows)
    tuned = microtune.load(artifact)
    per_token, kind = tuned.per_token, tuned.task_type.name
    inputs = texts_of(examples, per_token)
    ours = labels_of(tuned.predict([list(e.texts) if per_token else e.texts for e in examples]))
    results = []
    for name, options in FORMATS.items():
        folder = scratch / f"{Path(artifact).name}-{name}"
        report = export_and_check(artifact, folder, data_dir=data_dir, examples=rows, **options)
        exported = microtune.load(folder)
        theirs = labels_of(
            exported.predict([list(e.texts) if per_token else e.texts for e in examples])
        )
        row = {
            "artifact": artifact,
            "task": config["task"]["name"],
            "task_type": kind,
            "export": name,
            "format": report["format"],
            "dev_rows": report["examples"],
            "max_abs_logit_diff": report["max_abs_logit_diff"],
            "predict_model_folder_same": share(ours, theirs),
        }
        if name == "merged":
            found = pipeline_labels(folder, kind, inputs, per_token)
            row["pipeline_same"] = found if isinstance(found, str) else share(ours, found)
        if report["format"] == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            try:
                encoded = SentenceTransformer(str(folder), device="cpu").encode(
                    [e.texts[0] if len(e.texts) == 1 else tuple(e.texts) for e in examples],
                    convert_to_tensor=True,
                )
            except (TypeError, ValueError) as error:  # pairs, where encode takes none
                row["sentence_transformers_same"] = f"encode failed: {error}"[:120]
            else:
                labels = tuned.label_names
                st = (
                    [float(v) for v in encoded[:, 0]]
                    if kind == "regression"
                    else [labels[i] for i in encoded.argmax(-1).tolist()]
                )
                row["sentence_transformers_same"] = share(ours, st)
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="export-parity-"))
    for artifact in args.artifact:
        check_artifact(artifact, args.data_dir, args.rows, scratch)


if __name__ == "__main__":
    main()
