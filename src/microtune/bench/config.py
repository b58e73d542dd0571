"""The bench file: one model, data, protocol and list of methods, and the cells it makes.

A bench file is TOML (`bench/configs/full.toml` is the reference):

    name = "full"
    model = "sentence-transformers/all-MiniLM-L6-v2"
    data_dir = "../shared/data"          # relative to the working directory
    tasks = ["sst2", "rte"]
    seeds = [0, 1, 2]
    lrs = "lrs.toml"                     # optional: learning rates `bench tune` chose
    extends = "full.toml"                # optional: start from another file (relative to this)
    only = ["slash", "lora"]             # optional: keep these method labels (a smaller grid)

    [protocol]                           # `Protocol`'s fields
    max_steps = 1000
    [timing]                             # `Timing`'s fields
    rounds = 5
    [tune]                               # `TuneSettings`' fields (`microtune bench tune`)
    factors = [0.25, 1, 4]
    extend = 1                           # a best rate at the grid's edge: one more beyond it

    [[methods]]
    label = "slash-d2048"                # unique; the report's name for it
    method = "slash"                     # registry name (default: the label)
    lr = 2e-2                            # default: the method's own
    options = { d = 2048 }               # the method's config fields

`extends` merges key by key: a table (`protocol`, `timing`, `tune`) is merged field by field,
anything else (`methods`, `tasks`...) replaces the base's value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.errors import MicrotuneError
from microtune.methods import method_class
from microtune.tasks.spec import check_path_name, get_task
from microtune.training.config import LR_SCHEDULES, TrainConfig

CONFIG_FOLDER = Path(__file__).resolve().parents[3] / "bench" / "configs"  # in a checkout
QUICK_CONFIG = "quick.toml"


@dataclass(frozen=True)
class Protocol:
    """How every cell trains (the same for every method).

    Attributes:
        max_steps: optimizer steps, unless epochs is given.
        epochs: passes over the training data; when given it wins over max_steps (which is
            then unset: a TOML file cannot unset the max_steps of a file it extends).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_length: tokens per example.
        warmup_ratio: fraction of steps with linear warmup, then linear decay.
        weight_decay: AdamW weight decay.
        eval_batch_size: examples per batch when evaluating and timing inference.
        max_train_examples: use only the first N training examples (0: all).
        group_by_length: batches of similar length (as `microtune train`'s default).
        readout: the read-out of every method ("": the model's default).
        dtype: precision of the frozen base model.
    """

    max_steps: int | None = 1000
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    max_train_examples: int = 0
    group_by_length: bool = True
    readout: str = ""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            # TOML cannot unset a base file's max_steps, so epochs given wins.
            object.__setattr__(self, "max_steps", None)
        if self.max_train_examples < 0:
            raise MicrotuneError("protocol.max_train_examples must be >= 0 (0: all)")
        # TrainConfig owns the bounds of the training fields: check them there.

        shared = {f.name for f in dataclasses.fields(TrainConfig)}
        try:
            TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in shared})
        except MicrotuneError as error:
            raise MicrotuneError(f"protocol: {error}") from None


@dataclass(frozen=True)
class Timing:
    """What each cell measures besides its dev metrics.

    Attributes:
        inference_examples: dev examples timed for inference (0: the whole dev set).
        rounds: interleaved rounds of base, unmerged and merged inference (0: no timing).
        step_rounds: interleaved rounds of one training step and one no-grad forward of the
            same batch (0: none).
    """

    inference_examples: int = 0
    rounds: int = 5
    step_rounds: int = 10

    def __post_init__(self) -> None:
        if min(self.inference_examples, self.rounds, self.step_rounds) < 0:
            raise MicrotuneError("timing.* must be >= 0")


@dataclass(frozen=True)
class TuneSettings:
    """`microtune bench tune`: each method's learning rate from a grid, never on dev data.

    Attributes:
        factors: the grid, as multiples of each method's `lr` (a method's `lr_grid` replaces it).
        slice_fraction: fraction of each task's training set held out to score the grid on.
        slice_max: at most this many held-out examples per task.
        slice_seed: seeds which training examples are held out.
        seeds: training seeds per grid point (the score is their mean).
        write: the file the chosen rates go to, relative to this config (a bench file names it
            as `lrs`).
        protocol: fields of `Protocol` that differ while tuning (e.g. fewer steps).
        extend: rates a method's grid may grow by, one at a time, while its best rate is the
            highest or lowest tried (each one step beyond it, at the grid's own ratio): a rate
            chosen at an edge may be mistuned.
        tasks: the tasks tuned on, a subset of the bench's (empty: all of them): the full
            protocol on a few cheap tasks rather than a shortened one on every task.
    """

    factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    slice_fraction: float = 0.1
    slice_max: int = 1000
    slice_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    write: str = "lrs.toml"
    protocol: dict[str, Any] = field(default_factory=dict)
    extend: int = 0
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.extend, int) or self.extend < 0:
            raise MicrotuneError("tune.extend must be a whole number >= 0 (0: the grid as given)")
        if not 0 < self.slice_fraction < 1 or self.slice_max < 1:
            raise MicrotuneError("tune.slice_fraction must be in (0, 1) and tune.slice_max >= 1")
        if not self.factors or any(not (f > 0 and math.isfinite(f)) for f in self.factors):
            raise MicrotuneError("tune.factors must be positive numbers")


@dataclass(frozen=True)
class MethodEntry:
    """One method of the grid: a registry name, its options and learning rate.

    Attributes:
        label: unique name in the report and in cell names.
        method: registry name (`microtune info` lists them).
        lr: learning rate (None: the method's default).
        options: the method's config fields.
        lr_grid: learning rates `bench tune` tries (empty: tune.factors × lr).
        lr_from: take the tuned rate of this other label instead of tuning one (an ablation
            keeps its parent's rate, so that only the ablated setting differs).
        seeds: this method's seeds (empty: the bench's), e.g. one seed for an ablation.
        head_lr: the task head's own learning rate (None: the method's `lr`).
        lr_schedule: the rate's decay after the warmup (None: linear; `--lr-schedule`).
    """

    label: str
    method: str
    lr: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    lr_grid: tuple[float, ...] = ()
    lr_from: str = ""
    seeds: tuple[int, ...] = ()
    head_lr: float | None = None
    lr_schedule: str | None = None


@dataclass(frozen=True)
class Claim:
    """A comparison the report settles: method `a` against method `b` on the mean over the
    bench's tasks, seed by seed (seeds where both ran every task).

    Attributes:
        name: what the claim says, as the report's row title.
        a: the method label whose mean is compared.
        b: the method label it is compared with.
        kind: "ratio" (a ÷ b) or "difference" (a − b).
        goal: the value the claim needs (at least).
        max_bytes_ratio: also needs a's stored bytes ÷ b's at most this (0: no bound).
    """

    name: str
    a: str
    b: str
    kind: str = "ratio"
    goal: float = 1.0
    max_bytes_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CLAIM_KINDS:
            raise MicrotuneError(f"claim {self.name!r}: kind must be one of {CLAIM_KINDS}")


CLAIM_KINDS = ("ratio", "difference")


@dataclass(frozen=True)
class BenchConfig:
    """A whole bench file, resolved (paths absolute, learning rates filled in).

    Attributes:
        name: the bench's name (the report's title).
        model: base model: hub id or local folder.
        data_dir: data folder laid out like ../shared/data.
        tasks: task names.
        seeds: training seeds.
        methods: the methods, in report order.
        protocol: how every cell trains.
        timing: what every cell measures.
        tune: learning-rate tuning settings.
        lrs: the tuned learning-rates file (absolute; "" when none).
        claims: the comparisons the report settles (`[[claims]]`).
        source: the bench file this came from.
        held_out: a tuning bench's slice settings (what its dev split is): part of each cell's
            identity, so records scored on another slice are rerun.
    """

    name: str
    model: str
    data_dir: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[MethodEntry, ...]
    protocol: Protocol = Protocol()
    timing: Timing = Timing()
    tune: TuneSettings = TuneSettings()
    lrs: str = ""
    claims: tuple[Claim, ...] = ()
    source: str = ""
    held_out: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of everything that decides the results (not where the files are)."""
        record = self.to_dict()
        for key in ("source", "data_dir", "lrs", "claims"):
            record.pop(key)
        return digest(record)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid and what it measures."""

    entry: MethodEntry
    task: str
    seed: int
    config: BenchConfig

    @property
    def key(self) -> str:
        """File-name-safe name: label-task-sSEED."""
        return re.sub(r"[^A-Za-z0-9_.@=+-]", "_", f"{self.entry.label}-{self.task}-s{self.seed}")

    def spec(self) -> dict[str, Any]:
        """Everything the worker needs, as JSON."""
        config = self.config
        return {
            "key": self.key,
            "bench": config.name,
            "label": self.entry.label,
            "method": self.entry.method,
            "options": self.entry.options,
            "lr": self.entry.lr,
            "head_lr": self.entry.head_lr,
            "lr_schedule": self.entry.lr_schedule,
            "task": self.task,
            "seed": self.seed,
            "model": config.model,
            "data_dir": config.data_dir,
            "protocol": dataclasses.asdict(config.protocol),
            "timing": dataclasses.asdict(config.timing),
            "config_hash": config.config_hash(),
        }

    def cell_hash(self) -> str:
        """Hash of what decides this cell's training: a record with another is stale."""
        spec = self.spec()
        # head_lr, lr_schedule and held_out join the hash only when set, so older records
        # stay current.
        keys = ("method", "options", "lr", "task", "seed", "model")
        keys += tuple(k for k in ("head_lr", "lr_schedule") if spec[k] is not None)
        identity = {k: spec[k] for k in keys} | {"protocol": spec["protocol"]}
        if self.config.held_out:
            identity["held_out"] = self.config.held_out
        return digest(identity)


def digest(record: Any) -> str:
    """Short SHA-256 of canonical JSON."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cells(config: BenchConfig) -> list[Cell]:
    """The grid, seed by seed, task by task, method by method: a grid stopped part-way has
    whole tables of its first seeds rather than every seed of its first tasks."""
    seeds = sorted({s for e in config.methods for s in e.seeds or config.seeds})
    return [
        Cell(entry, task, seed, config)
        for seed in seeds
        for task in config.tasks
        for entry in config.methods
        if seed in (entry.seeds or config.seeds)
    ]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise MicrotuneError(
                "bench files are TOML, read with tomllib (Python 3.11+); on 3.10: pip install tomli"
            ) from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise MicrotuneError(f"bench file {path} not found; check the path") from None
    except tomllib.TOMLDecodeError as error:
        raise MicrotuneError(f"{path} is not valid TOML ({error})") from None


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's table with its `extends` chain applied (paths made absolute on the way)."""
    path = path.resolve()
    if path in seen:
        raise MicrotuneError(f"{path}: `extends` loops back to itself")
    table = read_toml(path)
    if isinstance(table.get("lrs"), str) and table["lrs"]:
        table["lrs"] = str(path.parent / table["lrs"])
    if isinstance(table.get("tune"), dict) and "write" in table["tune"]:
        table["tune"]["write"] = str(path.parent / table["tune"]["write"])
    base_name = table.pop("extends", None)
    if base_name is None:
        return table
    base = _merged(path.parent / base_name, (*seen, path))
    for key, value in table.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def _build(cls: type, table: Any, where: str) -> Any:
    """A dataclass from a TOML table; unknown keys are refused by name."""
    if not isinstance(table, dict):
        raise MicrotuneError(f"{where} must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise MicrotuneError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise MicrotuneError(f"{where}: {error}") from None


def _method(table: Any, index: int) -> MethodEntry:
    if not isinstance(table, dict) or "label" not in table and "method" not in table:
        raise MicrotuneError(f"methods[{index}] needs a label or a method name")
    table = dict(table)
    table.setdefault("label", table.get("method"))
    table.setdefault("method", table["label"])
    return _build(MethodEntry, table, f"methods[{index}] ({table['label']})")


def read_lrs(path: str) -> dict[str, float]:
    """The `[lrs]` table of a tuned learning-rates file: label -> rate."""
    if not Path(path).is_file():
        raise MicrotuneError(
            f"{path} is missing: run `microtune bench tune` on the tuning config that writes it, "
            "or drop `lrs` from the bench file to use each method's own lr"
        )
    rates = read_toml(Path(path)).get("lrs")
    if not isinstance(rates, dict):
        raise MicrotuneError(f"{path} has no [lrs] table; rerun `microtune bench tune`")
    return rates


def _tuned(methods: tuple[MethodEntry, ...], lrs: str) -> tuple[MethodEntry, ...]:
    """The methods with the learning rates of an `lrs` file, which must have each of them."""
    rates = read_lrs(lrs)
    missing = [m.label for m in methods if (m.lr_from or m.label) not in rates]
    if missing:
        raise MicrotuneError(
            f"{lrs} has no learning rate for {missing}; rerun `microtune bench tune`"
        )
    return tuple(dataclasses.replace(m, lr=float(rates[m.lr_from or m.label])) for m in methods)


def _methods(tables: list, only: list[str] | None, path: str | os.PathLike) -> tuple:
    """The `[[methods]]` entries, checked (labels unique, `lr_from` naming another label),
    then those `only` keeps, in its order."""
    methods = tuple(_method(m, i) for i, m in enumerate(tables))
    by_label = {m.label: m for m in methods}
    if len(by_label) != len(methods):
        raise MicrotuneError(f"{path}: method labels repeat; give each `[[methods]]` a label")
    for m in methods:
        if m.lr_from and (m.lr_from == m.label or m.lr_from not in by_label):
            raise MicrotuneError(
                f"{path}: {m.label}'s lr_from {m.lr_from!r} must name another method's label"
            )
    if only is None:
        return methods
    unknown = [label for label in only if label not in by_label]
    if unknown:
        raise MicrotuneError(f"{path}: `only` names unknown method labels {unknown}")
    return tuple(by_label[label] for label in only)


def _claims(tables: list, methods: list, path: str | os.PathLike) -> tuple[Claim, ...]:
    """The `[[claims]]`, each naming two method labels of the file (before `only`)."""
    labels = {m.get("label", m.get("method")) for m in methods if isinstance(m, dict)}
    claims = tuple(_build(Claim, c, f"claims[{i}]") for i, c in enumerate(tables))
    for claim in claims:
        unknown = sorted({claim.a, claim.b} - labels)
        if unknown:
            raise MicrotuneError(f"{path}: claim {claim.name!r} names unknown labels {unknown}")
    return claims


def load_config(
    path: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    *,
    tuned: bool = True,
) -> BenchConfig:
    """Read a bench file; `overrides` replace its top-level keys (tables merged by field).

    With `tuned`, the learning rates of the `lrs` file replace the methods' own; every method
    must have one there."""
    table = _merged(Path(path))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    only = table.pop("only", None)  # labels kept from the (inherited) methods, in that order
    known = {f.name for f in dataclasses.fields(BenchConfig)} - {"source", "held_out"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise MicrotuneError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("model", "tasks", "seeds", "methods"):
        if not table.get(key):
            raise MicrotuneError(f"{path}: `{key}` is missing or empty")
    methods = _methods(table["methods"], only, path)
    lrs = table.get("lrs") or ""
    if lrs and tuned:
        methods = _tuned(methods, lrs)
    model = str(table["model"])
    if os.path.isdir(model):
        model = os.path.abspath(model)  # the worker runs from anywhere
    data_dir = os.path.abspath(table["data_dir"]) if table.get("data_dir") else ""
    return BenchConfig(
        # the default output folder is runs/bench-<name>: never a way out of ./runs
        name=check_path_name(str(table.get("name", Path(path).stem)), "bench name"),
        model=model,
        data_dir=data_dir,
        tasks=tuple(table["tasks"]),
        seeds=tuple(int(s) for s in table["seeds"]),
        methods=methods,
        protocol=_build(Protocol, table.get("protocol", {}), "protocol"),
        timing=_build(Timing, table.get("timing", {}), "timing"),
        tune=_tune_settings(table, path),
        lrs=lrs,
        claims=_claims(table.get("claims", []), table["methods"], path),
        source=str(Path(path).resolve()),
    )


def _tune_settings(table: dict[str, Any], path: str | os.PathLike) -> TuneSettings:
    """The `[tune]` table: its tasks among the bench's, its `write` beside the bench file."""
    tune = _build(TuneSettings, table.get("tune", {}), "tune")
    foreign = sorted(set(tune.tasks) - set(table["tasks"]))
    if foreign:
        raise MicrotuneError(
            f"{path}: tune.tasks {foreign} are not among the bench's tasks "
            f"{list(table['tasks'])}; tune on some of those (or drop tune.tasks for all)"
        )
    if "write" not in table.get("tune", {}):
        tune = dataclasses.replace(tune, write=str(Path(path).resolve().parent / tune.write))
    return tune


def check_config(config: BenchConfig) -> None:
    """Every task and method exists and every method's options are valid, before any run."""

    for task in config.tasks:
        if get_task(task).type == "causal-lm":
            # Its main metric depends on the rows' shape and perplexity is lower-is-better.
            raise MicrotuneError(
                f"bench task {task}: causal-lm tasks are not supported yet (the bench compares "
                "sentence and token tasks, whose scores are higher-is-better); drop it from tasks"
            )
    for entry in config.methods:
        try:
            method_class(entry.method).config_class.from_dict(dict(entry.options))
        except MicrotuneError as error:
            raise MicrotuneError(f"method {entry.label}: {error}") from None
        for name, lr in (("lr", entry.lr), ("head_lr", entry.head_lr)):
            if lr is not None and not lr > 0:
                raise MicrotuneError(f"method {entry.label}: {name} must be positive, got {lr}")
        if entry.lr_schedule not in (None, *LR_SCHEDULES):
            raise MicrotuneError(
                f"method {entry.label}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                f"got {entry.lr_schedule!r}"
            )


def quick_config_path() -> Path:
    """bench/configs/quick.toml of this checkout (the `--quick` preset)."""
    path = CONFIG_FOLDER / QUICK_CONFIG
    if not path.is_file():
        raise MicrotuneError(
            f"--quick needs {path} (a checkout of the repository); pass a bench file instead"
        )
    return path
