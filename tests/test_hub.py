"""Artifacts on the Hugging Face hub: `microtune push` and loading by hub id (mocked, offline).

No test reaches the network: `HfApi` and `snapshot_download` are replaced by fakes that record
what they were asked, so the tests check what microtune sends and how it reads the answers.
"""

import json
import re
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import errors

import microtune
from microtune import cli
from microtune.common.files import CONFIG_FILE, TENSORS_FILE
from microtune.common.hub import parse_hub_id, resolve_artifact
from microtune.errors import MicrotuneError

from .test_serving import TEXTS, make_artifact

METRICS = {"metrics": {"accuracy": 0.8125}, "steps": 12, "train_examples": 64}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dirs):
    """A LoRA artifact on the tiny BERT with a metrics.json, plus files push must not send."""
    folder = make_artifact(tmp_path_factory.mktemp("hub") / "run", tiny_model_dirs["bert"])
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "train_log.jsonl").write_text("{}\n")
    return folder


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


class FakeApi:
    """Records every call `push_artifact` makes; `remote` lists the files already there."""

    calls: list = []
    remote: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def _call(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self._call("create_branch", repo_id, **kwargs)

    def list_repo_files(self, repo_id, **kwargs):
        self._call("list_repo_files", repo_id, **kwargs)
        return list(self.remote)

    def create_commit(self, repo_id, operations, **kwargs):
        self._call("create_commit", repo_id, list(operations), **kwargs)
        return SimpleNamespace(oid="abc123", commit_url=f"https://huggingface.co/{repo_id}/c")


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.remote, FakeApi.fail = [], [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def commit_of(api):
    (_, (repo_id, operations), kwargs) = next(c for c in api.calls if c[0] == "create_commit")
    return repo_id, operations, kwargs


def test_push_uploads_exactly_the_artifact_files_with_a_model_card(
    artifact, online, fake_api, capsys
):
    assert cli.main(["push", "--artifact", str(artifact), "--repo", "someone/sst2-lora"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["url"] == "https://huggingface.co/someone/sst2-lora"
    assert printed["revision"] == "main" and printed["commit"] == "abc123"

    create = next(c for c in fake_api.calls if c[0] == "create_repo")
    assert create[2] == {"private": None, "exist_ok": True}  # public unless the org says not
    repo_id, operations, kwargs = commit_of(fake_api)
    assert repo_id == "someone/sst2-lora" and kwargs["revision"] is None
    added = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert sorted(added) == sorted(["README.md", CONFIG_FILE, TENSORS_FILE, "metrics.json"])
    assert printed["files"] == [CONFIG_FILE, TENSORS_FILE, "metrics.json", "README.md"]
    for name in (CONFIG_FILE, TENSORS_FILE, "metrics.json"):
        assert added[name] == str(artifact / name)  # the folder's own bytes, nothing rewritten

    card = added["README.md"].decode()
    assert card.startswith("---\n") and "library_name: microtune" in card
    assert 'microtune.load("someone/sst2-lora")' in card
    assert "`lora`" in card and "`sst2`: negative, positive" in card
    assert "accuracy 0.8125 after 12 steps" in card
    assert "base_model:" not in card  # the tiny base is a local folder, not a hub id
    assert "model.save_pretrained" in card  # LoRA merges


def test_push_to_a_private_branch_and_a_stale_metrics_file(
    artifact, online, fake_api, tmp_path, capsys
):
    folder = tmp_path / "run"
    shutil.copytree(artifact, folder)
    (folder / "metrics.json").unlink()
    fake_api.remote = ["README.md", CONFIG_FILE, TENSORS_FILE, "metrics.json"]
    argv = ["push", "--artifact", str(folder), "--repo", "someone/x", "--private"]
    assert cli.main([*argv, "--revision", "v2", "--token", "hf_secret"]) == 0
    assert fake_api.calls[0] == ("init", "hf_secret")
    assert next(c for c in fake_api.calls if c[0] == "create_repo")[2]["private"] is True
    branch = next(c for c in fake_api.calls if c[0] == "create_branch")
    assert branch[2] == {"branch": "v2", "exist_ok": True}
    _, operations, kwargs = commit_of(fake_api)
    assert kwargs["revision"] == "v2"
    deleted = [op.path_in_repo for op in operations if type(op).__name__.endswith("Delete")]
    assert deleted == ["metrics.json"]  # the old run's numbers would otherwise stay beside it
    assert json.loads(capsys.readouterr().out)["revision"] == "v2"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / CONFIG_FILE).unlink(), "is not a microtune artifact"),
        (lambda f: (f / TENSORS_FILE).unlink(), "is missing or does not match"),
        (lambda f: (f / TENSORS_FILE).write_bytes(b"not the trained tensors"), "does not match"),
    ],
    ids=["no-config", "no-tensors", "stale-tensors"],
)
def test_an_incomplete_artifact_is_refused_before_any_hub_call(
    artifact, online, fake_api, tmp_path, damage, message
):
    folder = tmp_path / "run"
    shutil.copytree(artifact, folder)
    damage(folder)
    with pytest.raises(MicrotuneError, match=message):
        microtune_push(folder)
    assert fake_api.calls == []


def test_push_refuses_a_bad_repo_id_a_missing_folder_and_offline_before_any_hub_call(
    artifact, fake_api, tmp_path, monkeypatch
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MicrotuneError, match="is not a hub repo id; use owner/name"):
        microtune_push(artifact, "just-a-name")
    with pytest.raises(MicrotuneError, match="a branch goes in --revision"):
        microtune_push(artifact, "someone/x@v2")
    with pytest.raises(MicrotuneError, match="is not a folder"):
        microtune_push(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MicrotuneError, match="the hub is offline .*unset HF_HUB_OFFLINE"):
        microtune_push(artifact)
    assert fake_api.calls == []


def microtune_push(folder, repo="someone/x"):
    from microtune.artifacts.push import push_artifact

    return push_artifact(folder, repo)


def http_error(cls, status, message="Client Error"):
    """A huggingface_hub HTTP error as the hub client raises it, with a minimal response."""
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} {message}\n\nmore details on a second line", response=response)


def local_miss(cause):
    error = errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    error.__cause__ = cause
    return error


LOAD_ERRORS = [
    (
        lambda: http_error(errors.RepositoryNotFoundError, 401),
        re.escape(
            "no hub repo 'someone/art' is visible to you; check the path or repo id "
            "(a private repo: log in with `hf auth login` or set HF_TOKEN)"
        ),
    ),
    (lambda: http_error(errors.GatedRepoError, 403), "is gated: ask for access"),
    (
        lambda: http_error(errors.RevisionNotFoundError, 404),
        "revision 'v9' of hub repo 'someone/art' was not found",
    ),
    (lambda: http_error(errors.HfHubHTTPError, 403), "refused access .*hf auth login"),
    (lambda: local_miss(ConnectionError("refused")), "could not reach the hub .*no network"),
    (lambda: http_error(errors.HfHubHTTPError, 503), "the hub answered 503 .*try again later"),
]


@pytest.mark.parametrize("make_error, message", LOAD_ERRORS)
def test_each_hub_error_on_load_is_one_line(online, monkeypatch, capsys, make_error, message):
    def snapshot_download(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(MicrotuneError, match=message) as raised:
        microtune.load("someone/art@v9")
    assert "\n" not in str(raised.value)
    assert cli.main(["info", "--artifact", "someone/art@v9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "microtune: error:" in err


def test_offline_an_uncached_hub_id_is_one_line_and_a_cached_one_loads(artifact, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(kwargs["local_files_only"])
        if repo_id == "someone/cached":
            return str(artifact)
        raise local_miss(errors.OfflineModeIsEnabled("offline"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(
        MicrotuneError, match="'someone/art' is not a local folder and the hub is offline"
    ):
        resolve_artifact("someone/art")
    assert resolve_artifact("someone/cached") == artifact
    assert asked == [True, True]  # offline: the cache only, never a request


def test_push_errors_are_one_line(artifact, online, fake_api):
    # The hub client's HTTP library: httpx2 in huggingface_hub 2.x, httpx in 1.x.
    http_library = pytest.importorskip(
        "httpx2" if huggingface_hub.__version__.startswith("2.") else "httpx"
    )
    fake_api.fail = http_error(errors.HfHubHTTPError, 403, "You don't have the rights")
    with pytest.raises(MicrotuneError, match=r"refused access to 'someone/x' \(403\); .*--token"):
        microtune_push(artifact)
    fake_api.fail = http_library.ConnectError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(MicrotuneError, match="could not reach the hub .*check the connection"):
        microtune_push(artifact)


def test_a_hub_id_resolves_through_snapshot_download_to_a_folder_that_loads(
    artifact, online, monkeypatch, tmp_path, capsys
):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(artifact)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    local = microtune.load(artifact)
    assert calls == []
    hub = microtune.load("someone/sst2-lora@v1")
    assert hub.predict(TEXTS) == local.predict(TEXTS)
    repo_id, kwargs = calls[0]
    assert repo_id == "someone/sst2-lora" and kwargs["revision"] == "v1"
    assert kwargs["local_files_only"] is False
    assert sorted(kwargs["allow_patterns"]) == sorted(
        [CONFIG_FILE, TENSORS_FILE, "metrics.json", "README.md"]
    )

    assert cli.main(["info", "--artifact", "someone/sst2-lora"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == METRICS["metrics"]
    out = tmp_path / "merged"
    assert cli.main(["merge", "--artifact", "someone/sst2-lora", "--output", str(out)]) == 0
    merged = microtune.load(out)  # the export folder, in whichever format `merge` chose
    assert [row["label"] for row in merged.predict(TEXTS)] == [
        row["label"] for row in local.predict(TEXTS)
    ]


def test_a_hub_repo_without_an_artifact_is_refused(online, monkeypatch, tmp_path):
    (tmp_path / "README.md").write_text("a model card")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(MicrotuneError, match="holds no microtune.json.*--model, not --artifact"):
        microtune.load("google-bert/bert-base-uncased")


def test_a_local_folder_is_never_sent_to_the_hub(artifact, online, monkeypatch, tmp_path):
    def snapshot_download(*args, **kwargs):
        raise AssertionError("a local path went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(artifact, tmp_path / "someone" / "art")  # a folder named like a repo id
    assert microtune.load("someone/art").predict(TEXTS)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "file").write_text("")
    for path in ("runs/file", "./runs/missing", str(tmp_path / "missing"), "missing"):
        with pytest.raises(MicrotuneError, match="is not a folder; pass the folder"):
            resolve_artifact(path)


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("someone/art") == ("someone/art", None)
    assert parse_hub_id("some-one/art.v2@refs/pr/1") == ("some-one/art.v2", "refs/pr/1")
    for path in ("art", "a/b/c", "./a/b", "/abs/path", "../x/y", "a/../b", "~/x", "a/b@"):
        assert parse_hub_id(path) is None, path
