"""`microtune bench`: configs, the runner on a tiny model (records, resume), tuning, report."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from microtune.bench.config import CONFIG_FOLDER, Cell, cells, check_config, load_config
from microtune.bench.report import claim_table, seed_means
from microtune.bench.reproduce import REPRODUCED, TOLERANCE, reproduce
from microtune.bench.runner import CELLS, plan, read_records, run_bench, time_left
from microtune.bench.timing import padded_fraction
from microtune.bench.tune import (
    carve,
    choose,
    step_beyond,
    tried_rates,
    tune,
    tuning_config,
    write_lrs,
)
from microtune.bench.worker import train_command, train_config
from microtune.cli import run as cli_run
from microtune.errors import MicrotuneError
from microtune.methods import METHODS

from .conftest import WORDS

POSITIVE = {"good", "great", "fun", "best", "love"}


def toy_glue(folder, task="sst2", sizes=(("train", 64), ("validation", 24))):
    """A sentiment task in the tiny vocabulary, laid out like ../shared/data."""
    rng = random.Random(0)
    for split, size in sizes:
        rows = []
        for _ in range(size):
            words = rng.sample(WORDS, rng.randint(2, 9))  # varied lengths: padding to count
            rows.append({"sentence": " ".join(words), "label": int(bool(POSITIVE & set(words)))})
        path = folder / "glue" / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_quick(tmp_path, model_dir, **overrides):
    """The quick preset on the tiny BERT: 2 methods x 1 task x 1 seed x 2 steps."""
    base = {
        "model": str(model_dir),
        "data_dir": str(toy_glue(tmp_path / "data")),
        "tasks": ["sst2"],
        "methods": [{"label": "slash"}, {"label": "lora", "lr": 1e-3}],
        "only": None,  # the preset's selection of full.toml's labels
        "protocol": {"max_steps": 2, "batch_size": 8, "max_train_examples": 0},
        "timing": {"inference_examples": 0, "rounds": 2, "step_rounds": 2},  # 0: all
    }
    return load_config(CONFIG_FOLDER / "quick.toml", {**base, **overrides})


def test_bench_runs_every_cell_once_records_it_and_reports(tmp_path, tiny_model_dirs):
    config = tiny_quick(tmp_path, tiny_model_dirs["bert"])
    out = tmp_path / "bench"
    lines: list[str] = []
    summary = run_bench(config, out, device="cpu", jobs=2, threads=1, echo=lines.append)
    assert summary["failed"] == [] and summary["ran"] == 2, lines
    assert sum("ETA" in line for line in lines) == 2  # one progress line per finished cell

    records = {r["label"]: r for r in read_records(out)}
    assert set(records) == {"slash", "lora"}
    for record in records.values():
        assert record["steps"] == 2 and record["task"] == "sst2" and record["seed"] == 0
        assert record["metric"] == "accuracy" and 0 <= record["score"] <= 1
        assert record["trained"]["head"] == 2 * 32 + 2  # tiny hidden 32, two classes
        assert record["stored_bytes"] > 0 and record["train_time_s"] > 0
        assert record["step_ms"]["n"] == 1  # the first of the 2 steps is the warm-up
        assert record["peak_memory"]["rss_bytes"] > 10 * 2**20
        assert 0 < record["padding"]["padded_fraction"] < 1
        inference = record["inference"]
        assert inference["examples"] == 24 and inference["base"]["over_base"] == 1.0
        for model in ("base", "unmerged", "merged"):
            times = inference[model]
            assert times["n"] == 2 and times["min"] <= times["median"] <= times["max"]
        assert inference["merged_max_abs_logit_diff"] < 1e-4  # merged = trained model
        assert record["step_vs_forward"]["ratio"] > 0
        assert record["versions"]["torch"] == torch.__version__
        assert record["hardware"]["cores"] >= 1
        assert record["hardware"]["kernels"] == torch.backends.cpu.get_cpu_capability()
        assert f"--method {record['method']}" in record["train_command"]
        assert record["config_hash"] == config.config_hash()
        assert record["jobs"] == 2 and record["threads"] == 1  # timed beside another cell
    assert records["lora"]["lr"] == 1e-3
    assert records["slash"]["lr"] == METHODS["slash"].default_learning_rate
    assert records["lora"]["trained"]["method"] > records["slash"]["trained"]["method"] > 0

    # Resume: nothing finished runs again, and the records are untouched.
    before = {p.name: p.stat().st_mtime_ns for p in (out / CELLS).iterdir()}
    again = run_bench(config, out, device="cpu", jobs=2, threads=1, echo=lines.append)
    assert again["ran"] == 0 and again["finished"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / CELLS).iterdir()} == before
    # A changed learning rate makes exactly that cell stale.
    changed = dataclasses.replace(
        config,
        methods=(config.methods[0], dataclasses.replace(config.methods[1], lr=2e-3)),
    )
    _, finished, stale = plan(changed, out)
    assert [c.key for c in stale] == ["lora-sst2-s0"] and len(finished) == 1

    result = cli_run(["bench", "report", str(out)])
    text = (out / "report.md").read_text()
    assert "| slash |" in text and "| lora |" in text and "## sst2 (accuracy)" in text
    assert "timings taken with 2 cells at once on shared cores" in text.split("## Summary")[0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result["plots"] == []
    else:
        assert len(result["plots"]) == 4
        assert all((out / name).stat().st_size > 1000 for name in result["plots"])

    # A second task (records copied with other scores): the summary gains the mean over tasks,
    # for the methods that ran both.
    # All of them as if run one at a time: no warning about shared cores.
    for label, score in (("slash", 0.25), ("lora", None)):
        path = out / CELLS / f"{label}-sst2-s0.json"
        record = {**json.loads(path.read_text()), "jobs": 1}
        path.write_text(json.dumps(record))
        record.update(task="rte", cell=f"{label}-rte-s0", score=score)
        record["versions"] = {**record["versions"], "torch": "9.9"}  # a grid across an upgrade
        (out / CELLS / f"{label}-rte-s0.json").write_text(json.dumps(record))
    cli_run(["bench", "report", str(out)])
    head = (out / "report.md").read_text().split("## Summary")[0]
    assert "cells at once" not in head
    assert f"torch 9.9 (2 cells) / {torch.__version__} (2 cells)" in head  # lora-rte first
    summary_rows = (out / "report.md").read_text().split("## Summary")[1].splitlines()
    # Cost: a method's minutes per task, and one seed of every task (the sum of its medians).
    cost = (out / "report.md").read_text().split("## Cost")[1].split("\n## ")[0].splitlines()
    cost = [line for line in cost if line.startswith("|")]
    assert cost[0] == "| minutes per cell | sst2 | rte | one seed of every task |"
    minutes = records["slash"]["cell_time_s"] / 60  # the rte record is a copy of it
    assert cost[2] == f"| slash | {minutes:.1f} | {minutes:.1f} | {2 * minutes:.0f} |"
    assert cost[4].startswith("| every cell: median (min–max) | ")
    slash_row = next(line for line in summary_rows if line.startswith("| slash |"))
    lora_row = next(line for line in summary_rows if line.startswith("| lora |"))
    sst2, mean = records["slash"]["score"], (records["slash"]["score"] + 0.25) / 2
    assert slash_row.endswith(f"| {sst2:.4f} | 0.2500 | {mean:.4f} ± 0.0000 (1) |")
    assert lora_row.endswith("| – | – |")  # no rte score: no mean


def test_a_cell_trained_again_from_its_records_command_scores_the_same(tmp_path, tiny_model_dirs):
    config = tiny_quick(tmp_path, tiny_model_dirs["bert"], methods=[{"label": "lora", "lr": 1e-2}])
    out = tmp_path / "bench"
    assert run_bench(config, out, device="cpu", threads=1)["failed"] == []
    record = read_records(out)[0]

    # The same machine and threads: the `microtune train` command gives the bench's score,
    # bit for bit (the worker trains through the same api.train).
    native = cli_run(["bench", "reproduce", str(out), "lora-sst2-s0"])["checks"][0]
    assert native["rerun"] == record["score"] and native["within"]
    assert native["command"].startswith("microtune train --task sst2 --method lora")
    assert not (out / REPRODUCED / "runs" / "lora-sst2-s0").exists()  # scratch removed

    # A record whose score is off by 0.1 fails the check; AVX2 kernels still land within
    # float rounding of the true score.
    path = out / CELLS / "lora-sst2-s0.json"
    path.write_text(json.dumps({**record, "score": record["score"] + 0.1}))
    avx2 = reproduce(out, ["lora-sst2-s0"], cpu_capability="avx2")
    assert not avx2["within"] and abs(avx2["checks"][0]["difference"] + 0.1) <= TOLERANCE
    assert avx2["checks"][0]["kernels"] == "AVX2"

    cli_run(["bench", "report", str(out)])
    table = (out / "report.md").read_text().split("## Reproduction checks")[1].split("##")[0]
    assert (
        "| lora-sst2-s0 |" in table and f"| {native['kernels']} |" in table and "| AVX2 |" in table
    )
    # A check of a cell that ran again with other settings is not shown.
    path.write_text(json.dumps({**record, "cell_hash": "0" * 16}))
    cli_run(["bench", "report", str(out)])
    assert "## Reproduction checks" not in (out / "report.md").read_text()

    with pytest.raises(MicrotuneError, match="has no record of cell 'lora-cola-s0'.*lora-sst2"):
        reproduce(out, ["lora-cola-s0"])
    with pytest.raises(MicrotuneError, match="has no record of cell '../cells/lora-sst2-s0'"):
        reproduce(out, ["../cells/lora-sst2-s0"])
    with pytest.raises(MicrotuneError, match="cpu capability 'sse'"):
        reproduce(out, ["lora-sst2-s0"], cpu_capability="sse")


def test_configs_in_the_repo_parse_and_cover_the_registry():
    full = load_config(CONFIG_FOLDER / "full.toml", tuned=False)
    assert set(METHODS) <= {m.method for m in full.methods}  # every method of ours
    assert full.tasks == ("sst2", "cola", "mrpc", "rte", "stsb") and full.seeds == (0, 1, 2)
    assert full.lrs.endswith("lrs.toml")
    quick = load_config(CONFIG_FOLDER / "quick.toml")
    assert quick.tasks == ("sst2", "rte") and quick.seeds == (0,) and quick.lrs == ""
    labels = [m.label for m in full.methods]
    assert [m.label for m in quick.methods] == [
        "slash", "jrwarp", "full", "linear", "bitfit", "lora", "pafi", "hiwi",
        "peft-vera", "peft-lora-r1", "peft-ia3-kv", "peft-unilora-8k", "peft-tinylora-9k",
    ]  # fmt: skip
    assert {m.label: m for m in quick.methods}.items() <= {m.label: m for m in full.methods}.items()
    assert len(cells(quick)) == 2 * 13 and len(labels) == len(set(labels))
    with pytest.raises(MicrotuneError, match=r"`only` names unknown method labels \['nope'\]"):
        load_config(CONFIG_FOLDER / "quick.toml", {"only": ["slash", "nope"]})
    grid = load_config(CONFIG_FOLDER / "lr_grid.toml", tuned=False)
    assert grid.tune.write == full.lrs  # tuning writes what the full bench reads


def test_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('model = "m"\ntasks = ["sst2"]\nseeds = [0]\n[[methods]]\nlabel = "slash"\n')
    with pytest.raises(MicrotuneError, match=r"protocol: unknown key\(s\) \['steps'\]"):
        load_config(path, {"protocol": {"steps": 3}})
    with pytest.raises(MicrotuneError, match="labels repeat"):
        load_config(path, {"methods": [{"label": "slash"}, {"method": "slash"}]})
    with pytest.raises(MicrotuneError, match=r"^protocol: --batch-size and --grad-accum must"):
        load_config(path, {"protocol": {"batch_size": 0}})  # TrainConfig's bounds
    causal = load_config(path, {"tasks": ["sst2", "causal-lm"]})
    with pytest.raises(MicrotuneError, match="causal-lm tasks are not supported") as error:
        check_config(causal)
    assert "\n" not in str(error.value)
    wrong = load_config(path, {"methods": [{"label": "slash", "lr_schedule": "step"}]})
    with pytest.raises(MicrotuneError, match="slash: lr_schedule must be one of linear, cosine"):
        check_config(wrong)
    path.write_text('colour = "red"\n' + path.read_text())
    with pytest.raises(MicrotuneError, match=r"unknown key\(s\) \['colour'\]"):
        load_config(path)


def test_a_schedule_set_on_a_method_reaches_its_cells_and_their_command():
    plain = {"label": "slash", "lr": 0.02}
    cosine = {**plain, "label": "slash-cosine", "method": "slash", "lr_schedule": "cosine"}
    config = load_config(CONFIG_FOLDER / "quick.toml", {"methods": [plain, cosine], "only": None})
    first, second = (c for c in cells(config) if c.task == config.tasks[0])
    assert first.spec()["lr_schedule"] is None and second.spec()["lr_schedule"] == "cosine"
    # Unset, it leaves the cell's hash as it was before the option (committed records hold).
    unset = dataclasses.replace(second, entry=dataclasses.replace(second.entry, lr_schedule=None))
    assert unset.cell_hash() != second.cell_hash()
    assert unset.cell_hash() == dataclasses.replace(unset, entry=first.entry).cell_hash()
    spec = {**second.spec(), "output": "runs/x", "device": "cpu"}
    assert "--lr-schedule cosine" in train_command(spec)
    assert train_config(spec).lr_schedule == "cosine"
    assert "--lr-schedule" not in train_command({**first.spec(), "output": "x", "device": "cpu"})


def test_padded_fraction_counts_each_micro_batch_to_its_longest_row():
    lengths = [3, 5, 2, 2, 4]
    # micro-batches of 2: [3, 5] -> 10 positions, [2] -> 2, [2, 4] -> 8: 14 real of 20.
    result = padded_fraction(lengths, [[0, 1, 2], [3, 4]], batch_size=2)
    assert result["tokens"] == 20 and result["fraction"] == pytest.approx(1 - 16 / 20)


def test_tuning_slice_comes_from_training_data_only(tmp_path, tiny_model_dirs):
    data = toy_glue(tmp_path / "own", sizes=(("train", 50),))  # no dev split at all
    config = tiny_quick(tmp_path, tiny_model_dirs["bert"], data_dir=str(data))
    config = dataclasses.replace(
        config, tune=dataclasses.replace(config.tune, slice_fraction=0.2, factors=(0.5, 2.0))
    )
    carved = carve(config, tmp_path / "carved")
    train = (data / "glue/sst2/train.jsonl").read_text().splitlines()
    kept = (tmp_path / "carved/glue/sst2/train.jsonl").read_text().splitlines()
    held = (tmp_path / "carved/glue/sst2/validation.jsonl").read_text().splitlines()
    assert len(held) == 10 and len(kept) == 40 and sorted(kept + held) == sorted(train)

    grid = tuning_config(config, carved)
    slash_default = METHODS["slash"].default_learning_rate
    assert [m.lr for m in grid.methods] == [slash_default / 2, slash_default * 2, 5e-4, 2e-3]
    assert grid.timing.rounds == 0 and grid.data_dir == carved
    # The best mean on the slice wins; a rate with a missing cell is not eligible.
    records = [
        {"label": "slash@lr=0.01", "lr": 0.01, "score": 0.6},
        {"label": "slash@lr=0.04", "lr": 0.04, "score": 0.7},
        {"label": "lora@lr=0.0005", "lr": 0.0005, "score": 0.9},
    ]
    chosen = choose(config, records)
    assert chosen["slash"]["lr"] == 0.04 and chosen["lora"]["lr"] == 5e-4
    # A cell without a score (undefined metric) rules its rate out, with a note: never 0.
    records[1].update(score=None, cell="slash@lr=0.04-sst2-s0")
    notes: list[str] = []
    chosen = choose(config, records, notes.append)
    assert chosen["slash"]["lr"] == 0.01 and chosen["slash"]["grid"] == {0.01: 0.6}
    assert notes == ["slash@lr=0.04: skipped, no score (undefined metric) in slash@lr=0.04-sst2-s0"]
    with pytest.raises(MicrotuneError, match="no learning rate of slash finished every cell"):
        choose(config, records[1:], notes.append)


def test_tuning_on_some_of_the_tasks_carves_and_scores_only_those(tmp_path, tiny_model_dirs):
    data = toy_glue(toy_glue(tmp_path / "own", task="cola"), sizes=(("train", 50),))
    config = tiny_quick(
        tmp_path, tiny_model_dirs["bert"], data_dir=str(data), tasks=["sst2", "cola"]
    )
    config = dataclasses.replace(config, tune=dataclasses.replace(config.tune, tasks=("cola",)))
    carved = tmp_path / "carved"
    assert carve(config, carved) == str(carved)
    assert sorted(p.name for p in (carved / "glue").iterdir()) == ["cola"]
    grid = tuning_config(config, str(carved))
    assert {c.task for c in cells(grid)} == {"cola"} and grid.tasks == ("cola",)
    # Scores on another slice are other results: a tuning cell's identity names its slice.
    other = dataclasses.replace(config, tune=dataclasses.replace(config.tune, slice_max=5))
    hashes = [[c.cell_hash() for c in cells(tuning_config(c, "d"))] for c in (config, other)]
    assert all(a != b for a, b in zip(*hashes, strict=True))
    # One cell per rate is all a rate needs: the bench's other task is not waited for.
    records = [{"label": "slash@lr=0.01", "lr": 0.01, "score": 0.6}]
    assert (
        choose(dataclasses.replace(config, methods=config.methods[:1]), records)["slash"]["lr"]
        == 0.01
    )
    # The evidence grid tunes with its own protocol on its three short-input tasks.
    evidence = load_config(CONFIG_FOLDER / "evidence.toml", tuned=False)
    tuning = tuning_config(evidence, "data")
    assert tuning.protocol == evidence.protocol and tuning.tasks == ("sst2", "cola", "stsb")
    with pytest.raises(MicrotuneError, match=r"tune.tasks \['qnli'\] are not among the bench"):
        load_config(CONFIG_FOLDER / "quick.toml", {"tune": {"tasks": ["qnli"]}})


def test_evidence_grid_runs_seed_by_seed_and_ablations_keep_their_parents_rate(tmp_path):
    evidence = load_config(CONFIG_FOLDER / "evidence.toml", tuned=False)
    grid = cells(evidence)
    # 5 tasks x (5 methods x 3 seeds + 6 methods x seed 0); every seed-0 cell comes first.
    assert len(grid) == 5 * (5 * 3 + 6) and evidence.timing.rounds == 0
    assert [c.seed for c in grid] == sorted(c.seed for c in grid)
    assert {c.entry.label for c in grid if c.seed == 2} == {"slash", "full", "lora", "pafi", "hiwi"}
    tuned = [m.label for m in tuning_config(evidence, "data").methods]
    assert not any(label.startswith("pafi-random") for label in tuned)
    # Tuning part of the grid keeps the rates tuned before; the ablation reads pafi's.
    lrs = tmp_path / "lrs.toml"
    write_lrs(lrs, {"pafi": {"lr": 1e-3, "grid": {1e-3: 0.5}}}, "test")
    write_lrs(lrs, {"slash": {"lr": 4e-2, "grid": {4e-2: 0.7}}}, "test")
    config = load_config(
        CONFIG_FOLDER / "evidence.toml", {"lrs": str(lrs), "only": ["slash", "pafi-random"]}
    )
    assert [(m.label, m.lr) for m in config.methods] == [("slash", 4e-2), ("pafi-random", 1e-3)]
    with pytest.raises(MicrotuneError, match="pafi-random's lr_from 'nope' must name another"):
        load_config(
            CONFIG_FOLDER / "evidence.toml",
            {"methods": [{"label": "pafi-random", "method": "pafi", "lr_from": "nope"}]},
        )


def test_time_left_prices_each_cell_at_its_own_tasks_mean():
    grid = cells(load_config(CONFIG_FOLDER / "evidence.toml", tuned=False))
    rte = [c for c in grid if c.task == "rte"][:2]
    cola = [c for c in grid if c.task == "cola"][:1]
    seconds = {"sst2": [300.0, 500.0], "rte": [1500.0]}
    # RTE at its own 1,500 s; CoLA, not finished yet, at the mean over all (2,300 / 3).
    assert time_left(rte + cola, seconds, jobs=2) == pytest.approx((2 * 1500 + 2300 / 3) / 2)
    assert time_left(rte, {}, jobs=2) == 0.0  # nothing known yet


def test_committed_evidence_records_stay_current_under_todays_code():
    # Hours of CPU: a change to what enters a cell's hash would silently rerun every cell.
    evidence = load_config(CONFIG_FOLDER / "evidence.toml", tuned=False)
    folder = CONFIG_FOLDER.parent / "results" / "evidence"
    tuned = sorted((folder.parent / "evidence-tune").glob("*.json"))
    records = [json.loads(p.read_text()) for p in tuned]
    # Every rate tuned, the ones `tune.extend` added past a grid's edge included.
    grown = [
        dataclasses.replace(m, lr_grid=tuple(tried_rates(m, evidence.tune.factors, records)))
        for m in evidence.methods
    ]
    grid = tuning_config(dataclasses.replace(evidence, methods=tuple(grown)), "data")
    hashes = {c.key: c.cell_hash() for c in cells(grid)}
    for path in sorted(folder.glob("cells/*.json")):
        record = json.loads(path.read_text())
        config = load_config(CONFIG_FOLDER / "evidence.toml", {"lrs": ""})
        lr = {m.label: m for m in config.methods}[record["label"]]
        hashes[record["cell"]] = Cell(
            dataclasses.replace(lr, lr=record["lr"]), record["task"], record["seed"], config
        ).cell_hash()
        records.append(record)
    assert records
    assert [r["cell"] for r in records if r["cell_hash"] != hashes[r["cell"]]] == []


def test_tune_carves_runs_and_writes_rates_into_a_new_folder_and_again(tmp_path, tiny_model_dirs):
    overrides = {
        "model": str(tiny_model_dirs["bert"]),
        "data_dir": str(toy_glue(tmp_path / "data")),
        "tasks": ["sst2"],
        "methods": [
            {"label": "slash"},
            {"label": "slash-twin", "method": "slash", "lr_from": "slash"},
        ],
        "only": None,
        "protocol": {"max_steps": 2, "batch_size": 8, "max_train_examples": 0},
        "tune": {"factors": [0.5, 2.0], "protocol": {}, "write": str(tmp_path / "lrs.toml")},
    }
    for _ in range(2):  # the second call finds every cell finished
        summary = tune(CONFIG_FOLDER / "quick.toml", tmp_path / "t", overrides=overrides, echo=str)
        assert summary["failed"] == [] and set(summary["chosen"]) == {"slash"}
    config = load_config(
        CONFIG_FOLDER / "quick.toml", {**overrides, "lrs": str(tmp_path / "lrs.toml")}
    )
    assert config.methods[0].lr == config.methods[1].lr == summary["chosen"]["slash"]
    assert summary["ran"] == 0


def test_tune_grows_a_grid_past_the_edge_its_best_rate_sits_on(tmp_path, tiny_model_dirs):
    assert step_beyond([1e-3, 2e-3], 2e-3) == 4e-3 and step_beyond([1e-3, 2e-3], 1e-3) == 5e-4
    assert step_beyond([1e-3, 2e-3, 4e-3], 2e-3) is None
    overrides = {
        "model": str(tiny_model_dirs["bert"]),
        "data_dir": str(toy_glue(tmp_path / "data")),
        "tasks": ["sst2"],
        "methods": [{"label": "slash"}],
        "only": None,
        "protocol": {"max_steps": 2, "batch_size": 8, "max_train_examples": 0},
        "tune": {
            "factors": [0.5, 2.0],
            "extend": 2,
            "seeds": [0, 1],
            "write": str(tmp_path / "lrs.toml"),
        },
    }
    summary = tune(CONFIG_FOLDER / "quick.toml", tmp_path / "t", overrides=overrides, echo=str)
    scores = {}
    for record in read_records(tmp_path / "t"):
        scores[record["lr"]] = scores.get(record["lr"], 0) + record["score"] / 2
    # Replay: slash's 2e-2 × the factors, then one step (×4) past the edge the best (the lower
    # rate on a tie) sits on, while it sits on one, twice at most.
    tried = [1e-2, 4e-2]
    while len(tried) < 4:
        best = max(sorted(tried), key=lambda lr: scores[lr])
        if min(tried) < best < max(tried):
            break
        tried.append(float(f"{best * 4 if best == max(tried) else best / 4:.3g}"))
    assert sorted(tried) == sorted(scores) and summary["ran"] == 2 * len(tried)
    best = max(sorted(scores), key=lambda lr: scores[lr])
    assert summary["chosen"] == {"slash": best}
    # Cut off part-way through the last added rate: the same call runs its missing cell only.
    (tmp_path / "t" / CELLS / f"slash@lr={tried[-1]:g}-sst2-s1.json").unlink()
    again = tune(CONFIG_FOLDER / "quick.toml", tmp_path / "t", overrides=overrides, echo=str)
    assert again["ran"] == 1 and again["chosen"] == summary["chosen"]
    with pytest.raises(MicrotuneError, match="tune.extend must be a whole number"):
        load_config(CONFIG_FOLDER / "quick.toml", {**overrides, "tune": {"extend": -1}})


def test_the_evidence_grid_commits_the_removal_of_cells_whose_rate_changed(tmp_path):
    spec = importlib.util.spec_from_file_location("evidence", CONFIG_FOLDER.parent / "evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    config = load_config(CONFIG_FOLDER / "evidence.toml", {"only": ["slash"], "lrs": ""})
    # Two records of the quick bench: RTE's made current, SST-2's left with another protocol.
    quick, results = CONFIG_FOLDER.parent / "results" / "quick", tmp_path / "bench" / "results"
    results = results / "evidence"
    (results / CELLS).mkdir(parents=True)
    shutil.copy2(quick / "bench.json", results / "bench.json")
    for cell in ("slash-sst2-s0", "slash-rte-s0"):
        shutil.copy2(quick / CELLS / f"{cell}.json", results / CELLS / f"{cell}.json")
    rte = json.loads((results / CELLS / "slash-rte-s0.json").read_text())
    rte["cell_hash"] = Cell(config.methods[0], "rte", 0, config).cell_hash()
    (results / CELLS / "slash-rte-s0.json").write_text(json.dumps(rte))
    (results / "artifacts" / "slash-sst2-s0").mkdir(parents=True)
    (results / "artifacts" / "slash-sst2-s0" / "microtune.json").write_text("{}")
    (tmp_path / "docs").mkdir()
    shutil.copy2(CONFIG_FOLDER.parents[1] / ".gitignore", tmp_path / ".gitignore")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "cells"], check=True)
    evidence.drop_stale(config, results, tmp_path, commit_cells=True)
    assert sorted(p.name for p in (results / CELLS).iterdir()) == ["slash-rte-s0.json"]
    assert not (results / "artifacts" / "slash-sst2-s0").exists()
    log = subprocess.run([*git, "log", "-1", "--format=%s"], capture_output=True, text=True)
    assert log.stdout.strip() == "Evidence: to run again (slash-sst2-s0)"
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == ""  # the removal and the page, committed together


def test_claims_are_settled_seed_by_seed_on_the_mean_over_tasks():
    def record(label, task, seed, score):
        return {"label": label, "task": task, "seed": seed, "score": score}

    scores = {  # (label, seed): (sst2, rte)
        ("a", 0): (0.9, 0.6), ("a", 1): (0.8, 0.6), ("a", 2): (0.9, None),
        ("b", 0): (1.0, 0.5), ("b", 1): (0.9, 0.7), ("b", 2): (0.9, 0.6),
    }  # fmt: skip
    records = [
        record(label, task, seed, score)
        for (label, seed), pair in scores.items()
        for task, score in zip(("sst2", "rte"), pair, strict=True)
    ]
    means = seed_means(records, ["sst2", "rte"])
    assert means["a"] == pytest.approx({0: 0.75, 1: 0.7})  # seed 2 lacks a score on rte
    rows = [{"label": "a", "stored_bytes": 100}, {"label": "b", "stored_bytes": 400}]
    claims = [
        {"name": "a ÷ b", "a": "a", "b": "b", "kind": "ratio", "goal": 0.95},
        {"name": "a − b", "a": "a", "b": "b", "kind": "difference", "goal": -0.1},
        {"name": "small", "a": "a", "b": "b", "kind": "ratio", "goal": 0.9,
         "max_bytes_ratio": 0.2},
        {"name": "later", "a": "a", "b": "c", "kind": "ratio", "goal": 1.0},
    ]  # fmt: skip
    table = claim_table(claims, means, rows)[2:]
    ratios = [0.75 / 0.75, 0.7 / 0.8]  # seeds 0 and 1
    mean = sum(ratios) / 2
    assert table[0] == f"| a ÷ b | {mean:.4f} ({min(ratios):.4f}–1.0000) | 0, 1 | ≥ 0.95 | no |"
    assert table[1].startswith("| a − b | -0.0500 (-0.1000–0.0000) | 0, 1 | ≥ -0.1 | yes |")
    assert "stored bytes 0.250 × b's (goal ≤ 0.2) | no |" in table[2]  # the score is met, not bytes
    assert table[3] == "| later | not run yet | – | ≥ 1 | – |"


def test_evidence_page_is_published_from_the_records_with_its_plots(tmp_path):
    # bench/evidence.py --publish on a checkout holding records: the docs page and its plots.
    results = CONFIG_FOLDER.parent / "results"
    target = tmp_path / "bench" / "results" / "evidence"
    shutil.copytree(results / "quick" / CELLS, target / CELLS)
    planned = json.loads((results / "quick" / "bench.json").read_text())
    planned["config"]["tasks"].append("cola")  # a grid still running: no cola cell yet
    claim = {"name": "SLaSh ÷ full", "a": "slash", "b": "full", "kind": "ratio", "goal": 0.95}
    planned["config"]["claims"] = [claim]
    (target / "bench.json").write_text(json.dumps(planned))
    # The tuning behind the rates: slash's grid done (the middle rate run), full's part-way.
    tuned = tmp_path / "bench" / "results" / "evidence-tune"
    tuned.mkdir()
    # lora's done too, but the rates file still holds an earlier tuning's 2e-3.
    scores = {"slash": {0.01: 0.5, 0.02: 0.7, 0.04: 0.6}, "full": {2e-5: 0.4}}
    scores["lora"] = {5e-4: 0.6, 1e-3: 0.7, 2e-3: 0.5}
    for label, grid in scores.items():
        for lr, score in grid.items():
            for task in ("sst2", "cola", "stsb"):  # the tuning's tasks
                cell = f"{label}@lr={lr:g}-{task}-s0"
                record = {"label": f"{label}@lr={lr:g}", "lr": lr, "cell": cell, "score": score}
                record |= {"cell_time_s": 400.0, "threads": 1}  # 21 runs: 2⅓ CPU hours
                (tuned / f"{cell}.json").write_text(json.dumps(record))
    first = tmp_path / "bench" / "results" / "evidence-tune-200steps"
    first.mkdir()  # one run of an hour on two threads
    (first / "x.json").write_text(json.dumps({"cell_time_s": 3600.0, "threads": 2}))
    (tmp_path / "bench" / "configs").mkdir()
    write_lrs(
        tmp_path / "bench" / "configs" / "evidence-lrs.toml",
        {
            "slash": {"lr": 0.02, "grid": scores["slash"]},
            "full": {"lr": 2e-5, "grid": {}},
            "lora": {"lr": 2e-3, "grid": {}},
        },
        "test",
    )
    readme, home = tmp_path / "README.md", tmp_path / "docs" / "index.md"
    block = "<!-- evidence-claims:start -->\nstale\n<!-- evidence-claims:end -->"
    home.parent.mkdir()
    for path in (readme, home):
        path.write_text(f"# intro\n\n{block}\n\noutro\n")
    script = CONFIG_FOLDER.parent / "evidence.py"
    command = [sys.executable, str(script), "--publish", "--results", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    page = (tmp_path / "docs" / "evidence.md").read_text()
    # The README's claims block is the page's claims table now; the rest of it is untouched.
    written = readme.read_text()
    assert written.startswith("# intro\n\n<!-- evidence-claims:start -->\n| claim |")
    assert "| SLaSh ÷ full | not run yet |" in written and "stale" not in written
    assert written.endswith("cells so far.)\n<!-- evidence-claims:end -->\n\noutro\n")
    assert "[evidence page](docs/evidence.md)" in written  # from the repository's root
    assert home.read_text().replace("(evidence.md)", "(docs/evidence.md)") == written
    assert page.startswith("# The evidence: five GLUE tasks")
    # The task mean waits for the planned cola: none yet, and no claim settled on two tasks.
    slash = next(line for line in page.splitlines() if line.startswith("| slash | 1,024 |"))
    assert "3-task mean" in page and slash.endswith("| – | – |")
    assert "| SLaSh ÷ full | not run yet |" in page
    assert "bench report bench/results/evidence`" in page and str(tmp_path) not in page
    assert "| slash | 0.01: 0.5000 · **0.02: 0.7000** · 0.04: 0.6000 | inside |" in page
    assert "| full | 2e-05: 0.4000 · 5e-05: – · 0.0001: – · 0.0002: – | tuning |" in page
    assert "1,000 steps of each method at each rate on sst2, cola, stsb" in page
    assert "| lora | 0.0005: 0.6000 · 0.001: 0.7000 · 0.002: 0.5000 | tuning |" in page
    assert "tuning: 2.3 over 21 runs, and 2.0 over the first tuning's 1 runs." in page
    quick = read_records(target)
    cells_hours = sum(r["cell_time_s"] * r["threads"] for r in quick) / 3600
    total = f"{cells_hours + 7 / 3 + 2:.1f} CPU hours ({cells_hours:.1f} for the grid's"
    assert f"All told so far: {total} {len(quick)} cells, 4.3 for the tunings)." in page
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", page)
    assert images and all((tmp_path / "docs" / image).is_file() for image in images)
