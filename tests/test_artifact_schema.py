"""Artifacts are validated before use: generated corruptions of microtune.json and of the
tensor file each give one MicrotuneError line (the CLI: exit 2, one stderr line), never a
traceback, a silent cast or an allocation the file cannot back."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from microtune import cli
from microtune.artifacts.schema import FIX, FORMAT_VERSION
from microtune.artifacts.store import load_artifact, save_artifact
from microtune.backbone.load import fingerprint, load_backbone, tokenizer_fingerprint
from microtune.common.files import CONFIG_FILE, TENSORS_FILE, write_json
from microtune.common.files import file_sha256 as _file_sha256
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.examples import task_record
from microtune.tasks.spec import get_task

from .conftest import error_lines, tiny_batch

PRIVACY = {"epsilon": 7.9, "delta": 1e-5, "sigma": 1.1, "clip": 1.0, "steps": 3, "noise_seed": 5}


def make_artifact(folder, base, method_name, options, *, extra=None):
    """Save an artifact of `method_name` on the tiny model at `base`, with non-trivial tensors."""
    backbone, tokenizer = load_backbone(str(base))
    torch.manual_seed(0)
    method = build_method(method_name, options)
    model = TaskModel(backbone, HeadConfig(num_labels=2), method, tokenizer.mask_token_id)
    with torch.no_grad():
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    save_artifact(
        folder,
        model,
        method_name=method_name,
        base_model=str(base),
        base_fingerprint=fingerprint(backbone),
        task=task_record(get_task("sst2")),
        max_length=32,
        extra=extra,
        tokenizer=tokenizer,
    )
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dirs):
    """One SLaSh artifact (with a privacy record and metrics.json) and its logits."""
    folder = tmp_path_factory.mktemp("artifact") / "slash"
    model, tokenizer = make_artifact(
        folder, tiny_model_dirs["bert"], "slash", {"d": 16}, extra={"privacy": PRIVACY}
    )
    write_json(folder / "metrics.json", {"metrics": {"accuracy": 0.75}})
    with torch.no_grad():
        logits = model(**tiny_batch(tokenizer))
    return folder, logits


@pytest.fixture
def copy_of(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact[0], target)
    return target


def read_config(folder):
    return json.loads((folder / CONFIG_FILE).read_text())


def write_config(folder, config):
    # Hand edits may hold NaN / Infinity, which Python's json reads: write them as such. The
    # content hash goes, as in a format-1 artifact (the last without it), so that the schema is
    # what these tests test.
    config = {key: value for key, value in config.items() if key != "config_sha256"}
    if config.get("format_version") == FORMAT_VERSION:
        config["format_version"] = 1
    (folder / CONFIG_FILE).write_text(json.dumps(config, allow_nan=True))


def refused(folder, *fragments, **kwargs) -> str:
    """load_artifact must fail with one line holding every fragment."""
    with pytest.raises(MicrotuneError) as caught:
        load_artifact(folder, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- generated corruptions of microtune.json -----------------------------------------------

# Keys an older artifact lacks, or whose defaults apply: deleting them still loads.
OPTIONAL = {
    "config_sha256",
    "method_state",
    "parameters",
    "privacy",
    "base_model.tokenizer_fingerprint",
    "base_model.dtype",
    "head.head_dropout",
    "head.bias",  # older artifacts have a head with a bias; a bias-free one then fails on tensors
    "task.label_column",
    "task.label_names",
    "task.type",  # older artifacts name no task type (the head decides)
    "task.dev_split",
}


def leaves(record, prefix=()):
    """Every (path, value) in a nested JSON record, dicts descended into."""
    for key, value in record.items():
        path = (*prefix, key)
        yield path, value
        if isinstance(value, dict) and value:
            yield from leaves(value, path)


def wrong_type(value):
    """A JSON value of another type than `value` (a bool for an int, a string for a number)."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 5
    if isinstance(value, list):
        return "x"
    return ["x"]


def set_path(config, path, value=None, delete=False):
    record = config
    for key in path[:-1]:
        record = record[key]
    if delete:
        del record[path[-1]]
    else:
        record[path[-1]] = value


# The paths are read from a real config, so a key save_artifact adds is covered by itself.
@pytest.fixture(scope="module")
def paths(artifact):
    config = read_config(artifact[0])
    # The privacy record may gain informative keys; only its typed ones are checked. The
    # content hash has its own test (write_config drops it).
    return [
        (path, value)
        for path, value in leaves(config)
        if path[0] != "config_sha256"
        and (path[0] != "privacy" or len(path) == 1 or path[1] in PRIVACY)
    ]


def test_every_field_deleted_or_of_the_wrong_type(copy_of, paths):
    """Deleting a required key or giving any key the wrong type: one line naming the key."""
    original = read_config(copy_of)
    cases = 0
    for path, value in paths:
        dotted = ".".join(path)
        if path[0] == "method_config":  # deleted options take defaults: checked by the tensors
            deletions = []
        else:
            deletions = [] if dotted in OPTIONAL or path[0] == "privacy" else [True]
        for _ in deletions:
            config = copy.deepcopy(original)
            set_path(config, path, delete=True)
            write_config(copy_of, config)
            refused(copy_of, dotted, FIX)
            cases += 1
        config = copy.deepcopy(original)
        set_path(config, path, wrong_type(value))
        write_config(copy_of, config)
        refused(copy_of, dotted)
        cases += 1
    assert cases > 50


OUT_OF_BOUNDS = [
    ("format_version", 0, "format_version"),
    ("format_version", 3, "upgrade microtune"),
    ("format_version", True, "format_version"),
    ("max_length", 0, "max_length"),
    ("max_length", 7, "max_length"),
    ("max_length", -1, "max_length"),
    ("max_length", 10**12, "max_length"),
    ("max_length", 4096, "max_length: 4096 is out of range"),  # beyond the position table
    ("head.num_labels", 0, "head.num_labels"),
    ("head.num_labels", 10**9, "head.num_labels"),
    ("head.num_labels", 3, "differs from task.num_labels"),
    ("head.head_dropout", -0.5, "head.head_dropout"),
    ("head.head_dropout", 1.0, "head.head_dropout"),
    ("head.head_dropout", math.nan, "head.head_dropout"),
    ("head.head_dropout", math.inf, "head.head_dropout"),
    ("head.readout", "cls", "head.readout: read-out 'cls' is unknown"),
    ("task.num_labels", -2, "task.num_labels"),
    ("task.name", "../../etc", "task.name"),
    ("task.name", "..", "task.name"),
    ("task.name", "a/b", "task.name"),
    ("task.name", "a..b", "task.name"),
    ("task.name", "", "task.name"),
    ("task.dev_split", "../../../outside", "task.dev_split"),
    ("task.dev_split", "/etc/passwd", "task.dev_split"),
    ("task.metrics", ["bleu"], "task.metrics.0"),
    ("task.metrics", [], "task.metrics"),
    ("task.text_columns", [], "task.text_columns"),
    ("task.text_columns", ["a", "b", "c"], "task.text_columns"),
    ("task.label_names", ["only one"], "task"),
    # Only a causal LM has no label column (its round trip: tests/test_causal_lm.py).
    ("task.label_column", "", "task: label_column is empty for task type classification"),
    ("parameters.trained.head", -1, "parameters.trained.head"),
    ("parameters.stored.total", 1, "parameters.stored: total 1 is not head + method"),
    ("method", "sl4sh", "method"),
    ("method_config.d", 0, "method_config: slash: d must be an integer in 1..1048576"),
    ("method_config.d", -5, "method_config"),
    ("method_config.d", 10**12, "method_config: slash: d must be an integer in 1..1048576"),
    ("method_config.d", True, "method_config.d"),
    ("method_config.d", 16.0, "method_config.d"),
    ("method_config.projection_seed", -1, "method_config: --projection-seed"),
    ("method_config.projection_seed", 2**64, "method_config: --projection-seed"),
    ("method_config.projection_std_scale", math.inf, "method_config.projection_std_scale"),
    ("method_config.projection_std_scale", -1.0, "method_config: slash: projection_std_scale"),
    ("method_config.position", "nowhere", "method_config: slash: position 'nowhere'"),
    ("method_config.zz", 1, "method_config.zz: Extra inputs are not permitted"),
    ("method_state", {"k": 3}, "method_state: method 'slash' records no state"),
    ("base_model.fingerprint", "sha256:abc", "base_model.fingerprint"),
    ("base_model.tokenizer_fingerprint", "md5:0", "base_model.tokenizer_fingerprint"),
    ("base_model.dtype", "int8", "base_model.dtype"),
    ("base_model.name", "", "base_model.name"),
    ("tensors_sha256", "sha256:" + "0" * 64, "does not match microtune.json"),
    ("privacy.epsilon", -1.0, "privacy.epsilon"),
    ("privacy.noise_seed", "5", "privacy.noise_seed"),
    ("zz", 1, "zz: Extra inputs are not permitted"),
    ("head.zz", 1, "head.zz: Extra inputs are not permitted"),
    ("task.zz", 1, "task.zz"),
    ("base_model.zz", 1, "base_model.zz"),
]


@pytest.mark.parametrize(("path", "value", "expected"), OUT_OF_BOUNDS)
def test_out_of_bounds_fields_are_refused_in_one_line(copy_of, path, value, expected):
    config = read_config(copy_of)
    set_path(config, tuple(path.split(".")), value)
    write_config(copy_of, config)
    refused(copy_of, expected)


def test_sizes_the_tensor_file_cannot_back_are_refused_before_allocation(copy_of):
    """num_labels = 10^5 (under the schema's cap) on both head and task: 10^5 x 32 head numbers
    are not in an 80-number file, so nothing of that size is built."""
    config = read_config(copy_of)
    config["head"]["num_labels"] = config["task"]["num_labels"] = 10**5
    config["task"]["label_names"] = []
    write_config(copy_of, config)
    refused(copy_of, "head.num_labels: 100000 is more than the", FIX)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"text"', "\xff\xfe"])
def test_a_config_that_is_not_a_json_object_is_refused(copy_of, text):
    (copy_of / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    refused(copy_of, str(copy_of))


# -- the tensor file -----------------------------------------------------------------------


def rewrite_tensors(folder, change, *, update_hash=True):
    """Change the tensor file; by default also its hash in the config (a consistent edit)."""
    tensors = load_file(folder / TENSORS_FILE)
    change(tensors)
    save_file(tensors, folder / TENSORS_FILE)
    if update_hash:
        set_hash(folder)


def set_hash(folder):
    config = read_config(folder)
    config["tensors_sha256"] = _file_sha256(folder / TENSORS_FILE)
    write_config(folder, config)


def _set(name, value):
    return lambda tensors: tensors.__setitem__(name, value(tensors[name]))


TENSOR_CASES = {
    "float64 z": (_set("method.z", lambda t: t.double()), "method.z: stored torch.float64"),
    "int64 head weight": (
        _set("head.linear.weight", lambda t: t.long()),
        "head.linear.weight: stored torch.int64",
    ),
    "bool head bias": (_set("head.linear.bias", lambda t: t > 0), "stored torch.bool"),
    "longer z": (
        _set("method.z", lambda t: torch.zeros(17)),
        "method.z: stored torch.float32 (17,)",
    ),
    "2-d z": (_set("method.z", lambda t: t.view(4, 4)), "(4, 4) but the model built"),
    "NaN in z": (
        _set("method.z", lambda t: torch.where(t > 0, t, math.nan)),
        "method.z: holds NaN or infinite values",
    ),
    "inf in the head": (
        _set("head.linear.bias", lambda t: t + math.inf),
        "head.linear.bias: holds NaN",
    ),
    "missing head bias": (
        lambda tensors: tensors.pop("head.linear.bias"),
        "head.linear.bias: missing",
    ),
    "extra tensor": (
        lambda tensors: tensors.__setitem__("method.extra", torch.zeros(2)),
        "method.extra: not part of this method's stored state",
    ),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor_corruptions_are_refused_in_one_line(copy_of, case):
    change, expected = TENSOR_CASES[case]
    rewrite_tensors(copy_of, change)
    refused(copy_of, str(copy_of / TENSORS_FILE), expected, FIX)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header only"])
def test_a_broken_tensor_file_is_refused_in_one_line(copy_of, damage):
    path = copy_of / TENSORS_FILE
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": bytes(range(256)) * 4,
            "empty": b"",
            "header only": data[:8] + b"{" * 16,
        }[damage]
    )
    set_hash(copy_of)
    refused(copy_of, "not a valid safetensors file", FIX)


def test_a_torn_or_missing_tensor_file_is_refused(copy_of):
    rewrite_tensors(copy_of, _set("method.z", lambda t: t + 1), update_hash=False)
    refused(copy_of, "does not match microtune.json", FIX)
    (copy_of / TENSORS_FILE).unlink()
    refused(copy_of, "is missing or does not match")


@pytest.mark.parametrize(
    ("method_name", "options"),
    [("pafi", {"k": 12, "store_indices": True}), ("hiwi", {"r": 2, "variant": "bias"})],
)
def test_tensors_are_checked_against_what_the_model_stores(
    tmp_path, tiny_model_dirs, method_name, options
):
    """PaFi stores int64 positions and HiWi's bias variant computed biases, not what trains:
    the check asks the rebuilt model, so both load, and a cast of the positions is refused."""
    folder = tmp_path / method_name
    model, tokenizer = make_artifact(folder, tiny_model_dirs["bert"], method_name, options)
    reloaded, _, _ = load_artifact(folder)
    with torch.no_grad():
        batch = tiny_batch(tokenizer)
        assert torch.equal(reloaded(**batch), model(**batch))
    if method_name == "pafi":
        rewrite_tensors(folder, _set("method.positions", lambda t: t.int()))
        refused(folder, "method.positions: stored torch.int32", "expects torch.int64")


# -- older artifacts and the tokenizer -----------------------------------------------------


def test_an_older_artifact_still_loads_bit_identically(copy_of, artifact):
    config = read_config(copy_of)
    for key in ("method_state", "parameters", "privacy"):
        del config[key]
    del config["base_model"]["tokenizer_fingerprint"]
    del config["base_model"]["dtype"]
    write_config(copy_of, config)
    model, tokenizer, _ = load_artifact(copy_of)
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch(tokenizer)), artifact[1])


def test_a_shuffled_vocabulary_is_refused(copy_of, tmp_path, tiny_model_dirs):
    base = tmp_path / "shuffled"
    shutil.copytree(tiny_model_dirs["bert"], base)
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]  # same weights, other ids
    (base / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_fingerprint(load_backbone(str(base))[1]) != tokenizer_fingerprint(
        load_backbone(str(tiny_model_dirs["bert"]))[1]
    )
    refused(copy_of, "tokenizer mismatch", "--model", model_name=str(base))


def test_the_tokenizer_fingerprint_is_stable(tmp_path, tiny_model_dirs):
    """Re-saving the same tokenizer keeps its fingerprint (so artifacts keep loading)."""
    _, tokenizer = load_backbone(str(tiny_model_dirs["bert"]))
    shutil.copytree(tiny_model_dirs["bert"], tmp_path / "again")
    tokenizer.save_pretrained(tmp_path / "again")
    _, again = load_backbone(str(tmp_path / "again"))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)


def test_metrics_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"accuracy": math.nan})
    assert not (tmp_path / "m.json").exists()


# -- the CLI: exit 2, one line, user files unchanged ---------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert len(error_lines(err)) == 1 and err.endswith("\n"), err
    assert error_lines(err)[0].startswith("microtune: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_info_on_a_torn_artifact_fails_without_old_metrics(copy_of, capsys):
    code, out, _ = run_cli(capsys, "info", "--artifact", str(copy_of))
    assert code == 0 and "0.75" in out
    rewrite_tensors(copy_of, _set("method.z", lambda t: t * 2), update_hash=False)
    before = snapshot(copy_of)
    code, out, err = run_cli(capsys, "info", "--artifact", str(copy_of))
    assert_one_line_error(code, err, "does not match microtune.json")
    assert "0.75" not in out + err
    (copy_of / TENSORS_FILE).unlink()
    code, out, err = run_cli(capsys, "info", "--artifact", str(copy_of))
    assert_one_line_error(code, err, "is missing")
    assert snapshot(copy_of) == {k: v for k, v in before.items() if k != TENSORS_FILE}


def test_eval_on_another_task_is_refused_unless_data_is_explicit(copy_of, capsys, toy_files):
    before = snapshot(copy_of)
    code, _, err = run_cli(capsys, "eval", "--artifact", str(copy_of), "--task", "cola")
    assert_one_line_error(code, err, "trained on 'sst2', not 'cola'", "--data-file")
    code, out, err = run_cli(
        capsys,
        "eval",
        "--artifact",
        str(copy_of),
        "--task",
        "cola",
        "--data-file",
        str(toy_files / "dev.jsonl"),
        "--text-columns",
        "sentence",
    )
    assert code == 0, err
    assert "matthews_correlation" in json.loads(out)
    code, _, err = run_cli(
        capsys, "eval", "--artifact", str(copy_of), "--task", "mnli", "--data-file", "x.jsonl"
    )
    assert_one_line_error(code, err, "3 labels but the artifact's head has 2")
    assert snapshot(copy_of) == before


def test_cli_refuses_a_path_in_the_task_name_and_non_finite_tensors(copy_of, capsys, tmp_path):
    config = read_config(copy_of)
    config["task"]["name"] = "../outside"
    write_config(copy_of, config)
    code, _, err = run_cli(capsys, "eval", "--artifact", str(copy_of), "--data-dir", str(tmp_path))
    assert_one_line_error(code, err, "task.name: String should match pattern")
    config["task"]["name"] = "sst2"
    write_config(copy_of, config)
    rewrite_tensors(copy_of, _set("method.z", lambda t: t * math.nan))
    before = snapshot(copy_of)
    for command in ("merge", "export"):
        code, _, err = run_cli(
            capsys, command, "--artifact", str(copy_of), "--output", str(tmp_path / command)
        )
        assert_one_line_error(code, err, "method.z: holds NaN")
        assert not (tmp_path / command).exists()
    assert snapshot(copy_of) == before


def test_a_hand_edited_config_is_refused_by_its_content_hash(copy_of):
    """A valid but changed value (the projection seed, the label names) changes what the
    tensors mean: refused; without the hash (older artifacts) the schema alone decides."""
    original = read_config(copy_of)
    assert original["config_sha256"].startswith("sha256:")
    for path, value in ((("method_config", "projection_seed"), 1), (("max_length",), 64)):
        config = copy.deepcopy(original)
        set_path(config, path, value)
        (copy_of / CONFIG_FILE).write_text(json.dumps(config))
        refused(copy_of, "was changed after training", FIX)
    (copy_of / CONFIG_FILE).write_text(json.dumps(original))
    load_artifact(copy_of)  # the untouched config loads


def test_the_content_hash_cannot_be_deleted_to_switch_it_off(copy_of):
    """This version's artifacts always carry config_sha256: an edit that also deletes it is
    refused; a format-1 artifact (written before the hash) loads without one."""
    original = read_config(copy_of)
    assert original["format_version"] == FORMAT_VERSION >= 2
    edited = copy.deepcopy(original)
    edited["method_config"]["projection_seed"] = 1
    del edited["config_sha256"]
    (copy_of / CONFIG_FILE).write_text(json.dumps(edited))
    refused(copy_of, "config_sha256 is missing", FIX)
    older = {key: value for key, value in original.items() if key != "config_sha256"}
    (copy_of / CONFIG_FILE).write_text(json.dumps({**older, "format_version": 1}))
    load_artifact(copy_of)
