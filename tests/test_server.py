"""`microtune serve`: a real uvicorn server on an ephemeral loopback port, a real httpx client."""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

import microtune
from microtune import api
from microtune.backbone.options import ModelOptions
from microtune.cli.serve import artifact_folders
from microtune.serving.config import ServeConfig
from microtune.serving.http import bind, create_app
from microtune.serving.multitask import load_many
from microtune.tasks.spec import DataSource
from microtune.training.config import TrainConfig

from .conftest import WORDS
from .test_causal_lm import copy_rows, make_causal_model, write_jsonl
from .test_multitask import train, write_rows

TASKS = {
    "slash": ("sst2", "slash", {}),
    "lora": ("sst2", "lora", {}),
    "bitfit": ("sst2", "bitfit", {}),
}
TEXTS = ["the film is good", "a very dull plot , not fun", "love it"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dirs):
    folder = tmp_path_factory.mktemp("served")
    for seed, (name, (task, method, options)) in enumerate(TASKS.items()):
        train(folder, tiny_model_dirs["bert"], name, task, method, options, seed)
    return folder


@pytest.fixture(scope="module")
def engine(root):
    return load_many({"slash": root / "slash", "lora": root / "lora"})


@contextlib.contextmanager
def live(engine, **settings):
    """The app on uvicorn in a thread, bound to a free loopback port; stopped (drained) after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, ServeConfig(**settings)),
            log_level="warning",
            timeout_graceful_shutdown=20,
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(base_url=url, timeout=20) as client:
            yield client, server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def in_threads(calls):
    """Run the calls at once (one thread each); their results in order."""
    results = [None] * len(calls)

    def one(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(30)
    return results


def test_requests_of_several_tasks_share_batches_and_match_each_task(engine, root):
    with live(engine, max_wait_ms=300) as (client, _):
        calls = [
            lambda n=name: client.post("/v1/predict", json={"task": n, "inputs": TEXTS})
            for name in ("slash", "lora", "slash", "lora")
        ]
        responses = in_threads(calls)
        metrics = client.get("/metrics").text
        assert client.get("/ready").json() == {"status": "ready", "tasks": 2}
        listed = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    for name, response in zip(("slash", "lora", "slash", "lora"), responses, strict=True):
        assert response.status_code == 200, response.text
        want = microtune.load(root / name).predict(TEXTS)
        for got, expected in zip(response.json()["outputs"], want, strict=True):
            assert got["label"] == expected["label"]
            assert abs(got["score"] - expected["score"]) < 1e-5
    # Four requests of two tasks within 300 ms: fewer forward passes than requests.
    batches = float(metrics.split("microtune_batch_rows_count ")[1].split()[0])
    assert batches < 4
    assert 'microtune_requests_total{status="200",task="lora"} 2.0' in metrics
    assert "microtune_resident_tasks 2.0" in metrics and "microtune_queue_depth" in metrics
    assert 'microtune_task_resident_bytes{task="slash"}' in metrics
    assert 'microtune_request_seconds_bucket{le="0.5",task="slash"}' in metrics
    assert listed["lora"]["kind"] == "lora" and listed["slash"]["labels"] == [
        "negative",
        "positive",
    ]


def test_hot_load_and_delete_only_inside_the_artifact_root(root, tmp_path):
    engine = load_many({"slash": root / "slash"})
    outside = tmp_path / "outside"
    shutil.copytree(root / "bitfit", outside)  # a real artifact, outside the root
    (root / "escape").symlink_to(tmp_path)  # a link inside the root pointing out of it
    try:
        with live(engine, artifact_root=str(root)) as (client, _):
            loaded = client.post("/v1/tasks", json={"path": "bitfit", "name": "sentiment"})
            assert loaded.status_code == 201 and loaded.json()["method"] == "bitfit"
            answer = client.post("/v1/predict", json={"task": "sentiment", "inputs": ["fun"]})
            assert answer.status_code == 200
            want = microtune.load(root / "bitfit").predict(["fun"])[0]["score"]
            assert abs(answer.json()["outputs"][0]["score"] - want) < 1e-5
            for path in ("../outside", str(outside), "escape/outside", str(tmp_path)):
                refused = client.post("/v1/tasks", json={"path": path})
                assert refused.status_code == 403, path
                assert "artifact root" in refused.json()["error"]
            assert (
                client.post("/v1/tasks", json={"path": "bitfit", "name": "sentiment"}).status_code
                == 409
            )
            assert client.delete("/v1/tasks/sentiment").json() == {"deleted": "sentiment"}
            gone = client.post("/v1/predict", json={"task": "sentiment", "inputs": ["fun"]})
            assert gone.status_code == 404 and "unknown task" in gone.json()["error"]
            assert client.delete("/v1/tasks/sentiment").status_code == 404
    finally:
        (root / "escape").unlink()


def test_bad_requests_are_one_line_json_4xx(engine):
    bad = {
        400: [b'{"task": "slash", "inputs": [', b"\xff\xfe"],
        404: [b'{"task": "nope", "inputs": ["fun"]}'],
        422: [
            b'["fun"]',
            b'{"task": "slash", "inputs": "fun"}',
            b'{"task": "slash", "inputs": [["a", "b"]]}',  # a pair for a one-text task
            b'{"task": "slash", "inputs": [7]}',
            b'{"task": "slash", "inputs": []}',
            b'{"task": 3, "inputs": ["fun"]}',
            b'{"task": "slash", "prompts": ["a"]}',
        ],
    }
    with live(engine, max_body_kb=1) as (client, _):
        for status, bodies in bad.items():
            for body in bodies:
                path = "/v1/generate" if b"prompts" in body else "/v1/predict"
                response = client.post(path, content=body)
                assert response.status_code == status, (body, response.text)
                error = response.json()["error"]
                assert "\n" not in error and "Traceback" not in error
        huge = {"task": "slash", "inputs": ["fun " * 400]}
        assert client.post("/v1/predict", json=huge).status_code == 413
        chunked = client.post(
            "/v1/predict", content=iter([b'{"task": "slash", "inputs": ["', b"a" * 2000, b'"]}'])
        )
        assert chunked.status_code == 413
        assert (
            client.post("/v1/predict", json={"task": "slash", "inputs": ["fun"]}).status_code == 200
        )


def test_the_api_key_guards_every_endpoint_but_health(engine, monkeypatch):
    monkeypatch.setenv("MICROTUNE_API_KEY", "s3cret")
    with live(engine) as (client, _):
        assert client.get("/health").status_code == 200
        for path in ("/ready", "/metrics", "/v1/tasks"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        body = {"task": "slash", "inputs": ["fun"]}
        assert client.post("/v1/predict", json=body).status_code == 401
        ok = client.post("/v1/predict", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/v1/tasks", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(engine):
    body = {"task": "slash", "inputs": ["fun"]}
    with live(engine, max_queue=2, max_wait_ms=1500, retry_after_s=3) as (client, _):
        calls = [lambda: client.post("/v1/predict", json=body) for _ in range(3)]
        first, second, third = in_threads(calls)
    assert first.status_code == second.status_code == 200
    assert third.status_code == 503 and third.headers["retry-after"] == "3"
    assert "queue is full" in third.json()["error"]


def test_a_crashing_batch_fails_its_requests_and_the_server_goes_on(engine, monkeypatch):
    original = engine.run
    calls = {"n": 0}

    def crash_once(requests):  # a fault inside the model, once
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(requests)

    monkeypatch.setattr(engine, "run", crash_once)
    with live(engine) as (client, _):
        failed = client.post("/v1/predict", json={"task": "slash", "inputs": ["fun"]})
        assert failed.status_code == 500 and "Traceback" not in failed.text
        assert failed.json()["error"].startswith("internal error")
        assert (
            client.post("/v1/predict", json={"task": "lora", "inputs": ["fun"]}).status_code == 200
        )


def test_shutdown_drains_in_flight_requests(engine):
    body = {"task": "slash", "inputs": TEXTS}
    with live(engine, max_wait_ms=1000) as (client, server):
        results = []
        thread = threading.Thread(
            target=lambda: results.append(client.post("/v1/predict", json=body))
        )
        thread.start()
        time.sleep(0.3)  # the request waits in the batcher
        server.should_exit = True  # as SIGTERM does
        thread.join(30)
    assert results and results[0].status_code == 200 and len(results[0].json()["outputs"]) == 3


def test_the_command_finds_artifacts_in_folders(root):
    folders = artifact_folders([str(root)])
    assert set(folders) == set(TASKS)
    assert artifact_folders([str(root / "slash")]) == {"slash": root / "slash"}
    with pytest.raises(Exception, match="holds no microtune artifact"):
        artifact_folders([os.fspath(root / "nothing")])


def test_generate_serves_a_causal_lm_task(tmp_path):
    base = make_causal_model("gpt2", tmp_path / "gpt2", tie=True)
    files = [write_jsonl(tmp_path / f"{s}.jsonl", copy_rows(16, i)) for i, s in enumerate("td")]
    folder = tmp_path / "echo"
    api.train(
        "causal-lm",
        "slash",
        folder,
        model=ModelOptions(name=str(base), device="cpu", max_length=32),
        data=DataSource(train_file=files[0], dev_file=files[1]),
        train_config=TrainConfig(max_steps=4, batch_size=8, eval_every=0, progress=False),
)  # fmt: skip
    engine = load_many([folder])
    prompts = ["the film is", "love"]
    with live(engine) as (client, _):
        body = {"task": "echo", "prompts": prompts, "max_new_tokens": 5}
        answer = client.post("/v1/generate", json=body)
        too_many = client.post("/v1/generate", json={**body, "max_new_tokens": 10_000})
        wrong = client.post("/v1/predict", json={"task": "echo", "inputs": ["the film"]})
        metrics = client.get("/metrics").text
    assert answer.status_code == 200
    # Generation is counted and timed like prediction (the 422s of both routes too).
    assert 'microtune_requests_total{status="200",task="echo"} 1.0' in metrics
    assert 'microtune_requests_total{status="422",task="echo"} 2.0' in metrics
    assert 'microtune_request_seconds_count{task="echo"} 3.0' in metrics
    assert answer.json()["outputs"] == microtune.load(folder).generate(prompts, max_new_tokens=5)
    assert too_many.status_code == 422 and wrong.status_code == 422


def test_a_queued_request_is_answered_by_its_own_task_or_refused(root):
    """Deleted and another artifact hot-loaded under the same name while the request waits in
    the batcher: a 409, never the other task's labels (the request is bound to its task)."""
    engine = load_many({"y": root / "slash"})
    body = {"task": "y", "inputs": ["fun"]}
    with live(engine, artifact_root=str(root), max_wait_ms=1500) as (client, _):
        results = []
        thread = threading.Thread(
            target=lambda: results.append(client.post("/v1/predict", json=body))
        )
        thread.start()
        time.sleep(0.4)  # the request waits in the batcher for more rows
        assert client.delete("/v1/tasks/y").status_code == 200
        assert client.post("/v1/tasks", json={"path": "lora", "name": "y"}).status_code == 201
        thread.join(30)
        again = client.post("/v1/predict", json=body)
    assert results[0].status_code == 409, results[0].text
    assert "replaced" in results[0].json()["error"]
    assert again.status_code == 200  # a request admitted after the reload runs on the new task
    with pytest.raises(microtune.MicrotuneError, match="replaced"):
        stale = engine.encode("y", ["fun"])
        engine.remove("y")
        engine.add(root / "bitfit", "y")
        engine.run([stale])


def test_a_request_of_many_inputs_runs_in_batches_of_the_batch_size(engine, root):
    texts = [f"{TEXTS[i % 3]} {i}" for i in range(10)]
    with live(engine, max_batch_size=4, max_inputs=10) as (client, _):
        answer = client.post("/v1/predict", json={"task": "slash", "inputs": texts})
        metrics = client.get("/metrics").text
    assert answer.status_code == 200, answer.text
    want = microtune.load(root / "slash").predict(texts)
    got = answer.json()["outputs"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(abs(g["score"] - w["score"]) < 1e-5 for g, w in zip(got, want, strict=True))
    # Three forward passes (4 + 4 + 2 rows), none over --max-batch-size.
    assert "microtune_batch_rows_count 3.0" in metrics
    assert 'microtune_batch_rows_bucket{le="4.0"} 3.0' in metrics


def test_fields_the_server_does_not_honour_are_refused_by_name(engine):
    refused = {
        "/v1/generate": [
            ({"task": "slash", "prompts": ["a"], "max_new_tokens": True}, '"max_new_tokens"'),
            ({"task": "slash", "prompts": ["a"], "temperature": 0.7}, '"temperature"'),
            ({"task": "slash", "prompts": ["a"], "stream": True}, '"stream"'),
        ],
        "/v1/predict": [({"task": "slash", "inputs": ["fun"], "raw_scores": True}, '"raw_scores"')],
        "/v1/tasks": [({"path": "slash", "name": "x", "force": True}, '"force"')],
    }
    with live(engine) as (client, _):
        for path, cases in refused.items():
            for body, named in cases:
                response = client.post(path, json=body)
                assert response.status_code == 422, (body, response.text)
                assert named in response.json()["error"], (body, response.text)
        ok = client.post("/v1/predict", json={"task": "slash", "inputs": ["fun"]})
        assert ok.status_code == 200


def test_4xx_answers_are_counted_and_a_deleted_tasks_series_go(root):
    engine = load_many({"slash": root / "slash"})
    with live(engine, artifact_root=str(root), max_body_kb=1) as (client, _):
        statuses = [
            client.post("/v1/predict", json={"task": "slash", "inputs": [7]}).status_code,
            client.post("/v1/predict", json={"task": "nope", "inputs": ["a"]}).status_code,
            client.post("/v1/predict", content=b'{"task": ').status_code,
            client.post("/v1/predict", json={"task": "slash", "inputs": ["a" * 2000]}).status_code,
        ]
        assert statuses == [422, 404, 400, 413]
        assert client.post("/v1/tasks", json={"path": "bitfit", "name": "gone"}).status_code == 201
        assert client.post("/v1/predict", json={"task": "gone", "inputs": ["a"]}).status_code == 200
        before = client.get("/metrics").text
        assert client.delete("/v1/tasks/gone").status_code == 200
        after = client.get("/metrics").text
    assert 'microtune_requests_total{status="422",task="slash"} 1.0' in before
    for status in ("404", "400", "413"):  # no task name of a stranger's becomes a series
        assert f'microtune_requests_total{{status="{status}",task="unknown"}} 1.0' in before
    assert 'task="gone"' in before and 'task="gone"' not in after
    assert 'microtune_requests_total{status="422",task="slash"} 1.0' in after


def test_a_file_linked_out_of_the_root_or_folder_is_never_read(root, tmp_path):
    """The folder is inside the root, but its tensor file is a link to one outside it."""
    linked = root / "linked"
    linked.mkdir()
    shutil.copy(root / "bitfit" / "microtune.json", linked)
    outside = tmp_path / "adapter.safetensors"
    shutil.copy(root / "bitfit" / "adapter.safetensors", outside)
    (linked / "adapter.safetensors").symlink_to(outside)
    engine = load_many({"slash": root / "slash"})
    try:
        with live(engine, artifact_root=str(root)) as (client, _):
            refused = client.post("/v1/tasks", json={"path": "linked"})
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert "links outside" in error and "\n" not in error
            assert client.get("/v1/tasks").json()["tasks"][0]["name"] == "slash"
        with pytest.raises(microtune.MicrotuneError, match="links outside"):
            load_many([linked])
        export = tmp_path / "export"
        export.mkdir()
        (export / "microtune_export.json").write_text('{"format": "bert"}')
        (export / "config.json").symlink_to(outside)
        with pytest.raises(microtune.MicrotuneError, match="links outside"):
            microtune.load(export)
    finally:
        shutil.rmtree(linked)


def test_the_serving_line_comes_once_the_port_accepts_and_brackets_an_ipv6_host(root):
    sock = bind(ServeConfig(host="::1", port=0))
    try:  # bound and listening: a client that connects at once is queued, not refused
        socket.create_connection(sock.getsockname()[:2], timeout=5).close()
    finally:
        sock.close()
    command = [sys.executable, "-m", "microtune", "serve", "--artifacts", str(root / "slash")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [*command, "--host", "::1", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        url = json.loads(process.stdout.readline())["serving"]
        assert url.startswith("http://[::1]:"), url
        assert httpx.get(f"{url}/health", timeout=20).status_code == 200  # no wait, no retry
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def test_a_client_gone_mid_body_leaves_no_traceback_in_the_log(engine, capfd):
    with live(engine) as (client, _):
        port = client.base_url.port
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                    b'\r\nContent-Length: 1000\r\n\r\n{"task": "slash", "inp'
                )
                time.sleep(0.2)  # the server is reading the body when the client goes
        time.sleep(0.5)
        assert (
            client.post("/v1/predict", json={"task": "slash", "inputs": ["a"]}).status_code == 200
        )
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err, err[-2000:]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tiny_model_dirs):
    """A classification task of three labels, a regression and a token task, on one base."""
    folder = tmp_path_factory.mktemp("ranked")
    rng, rows = random.Random(3), []
    for _ in range(64):
        words = rng.sample(WORDS, 5)
        count = sum(w in ("good", "great", "fun", "love", "best") for w in words)
        rows.append({"text": " ".join(words), "label": ("none", "one", "many")[min(count, 2)]})
    files = write_rows(folder / "data" / "topic", rows)
    api.train(
        "classification",
        "slash",
        folder / "topic",
        model=ModelOptions(name=str(tiny_model_dirs["bert"]), device="cpu", max_length=32),
        data=DataSource(train_file=files / "train.jsonl", dev_file=files / "dev.jsonl"),
        train_config=TrainConfig(max_steps=8, batch_size=8, eval_every=0, progress=False,
                                 learning_rate=0.05),
    )  # fmt: skip
    model_dir = tiny_model_dirs["bert"]
    train(folder, model_dir, "stsb", "regression", "slash", {})
    train(folder, model_dir, "ner", "token-classification", "slash", {})
    return {name: folder / name for name in ("topic", "stsb", "ner")}


def test_top_k_ranks_every_labels_score_best_first(ranked):
    inputs = [*TEXTS, {"text": "love it , great fun"}]
    model = microtune.load(ranked["topic"])
    probabilities, names = model.logits(inputs).softmax(-1), model.label_names
    assert len(names) == 3
    with live(load_many(ranked)) as (client, _):
        body = {"task": "topic", "inputs": inputs}
        plain = client.post("/v1/predict", json=body).json()["outputs"]
        ranks = {k: client.post("/v1/predict", json={**body, "top_k": k}) for k in (1, 2, None)}
    for k, answer in ranks.items():
        assert answer.status_code == 200, answer.text
        for row, (labels, best) in enumerate(zip(answer.json()["outputs"], plain, strict=True)):
            order = probabilities[row].argsort(descending=True)[: k or 3].tolist()
            assert [x["label"] for x in labels] == [names[i] for i in order]  # best first
            want = probabilities[row][order].tolist()
            assert [x["score"] for x in labels] == pytest.approx(want, abs=1e-5)
            assert labels[0] == best  # the first is the answer without top_k, exactly
    assert sorted(x["label"] for x in ranks[None].json()["outputs"][0]) == sorted(names)


def test_top_k_out_of_range_or_on_a_task_without_labels_is_a_422(ranked):
    refused = [
        ({"task": "topic", "top_k": 0}, '"top_k": Input should be greater than or equal to 1'),
        ({"task": "topic", "top_k": 4}, '"top_k" must be 1 to 3'),
        ({"task": "topic", "top_k": True}, '"top_k"'),
        ({"task": "topic", "top_k": "all"}, '"top_k"'),
        ({"task": "topic", "top_k": 1.5}, '"top_k"'),
        ({"task": "stsb", "top_k": 1}, "a regression task has no labels to rank"),
        ({"task": "ner", "top_k": None}, "a token-classification task has no labels to rank"),
    ]
    with live(load_many(ranked)) as (client, _):
        for body, says in refused:
            answer = client.post("/v1/predict", json={"inputs": [["love", "it"]], **body})
            assert answer.status_code == 422, (body, answer.text)
            assert says in answer.json()["error"] and "\n" not in answer.json()["error"], body
        # Without top_k, a regression's and a token task's records are answered as they are.
        for name, inputs in (("stsb", ["love it"]), ("ner", [["love", "it"]])):
            answer = client.post("/v1/predict", json={"task": name, "inputs": inputs})
            assert answer.status_code == 200, answer.text
            (got,), (want,) = answer.json()["outputs"], microtune.load(ranked[name]).predict(inputs)
            assert got.keys() == want.keys() and got.get("tags") == want.get("tags"), got
            assert got.get("score", 0) == pytest.approx(want.get("score", 0), abs=1e-5)


ROUTES = {  # (path, method): (request body, answer, its status)
    ("/v1/predict", "post"): ("PredictRequest", "PredictResponse", "200"),
    ("/v1/generate", "post"): ("GenerateRequest", "GenerateResponse", "200"),
    ("/v1/tasks", "get"): (None, "TaskList", "200"),
    ("/v1/tasks", "post"): ("LoadTaskRequest", "TaskInfo", "201"),
    ("/v1/tasks/{name}", "delete"): (None, "Deleted", "200"),
    ("/health", "get"): (None, "Health", "200"),
    ("/ready", "get"): (None, "Ready", "200"),
}


def refs(value):
    """Every "$ref" in a JSON document."""
    if isinstance(value, dict):
        yield from ([value["$ref"]] if "$ref" in value else [])
        for item in value.values():
            yield from refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs(item)


def test_openapi_names_every_routes_request_and_answer_and_docs_show_them(engine):
    with live(engine) as (client, _):
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
    models = schema["components"]["schemas"]
    for (path, method), (request, answer, status) in ROUTES.items():
        operation = schema["paths"][path][method]
        if request is not None:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body["$ref"] == f"#/components/schemas/{request}", path
            assert models[request]["additionalProperties"] is False  # unknown fields refused
        content = operation["responses"][status]["content"]["application/json"]["schema"]
        assert content["$ref"] == f"#/components/schemas/{answer}", path
    assert {"task", "inputs", "top_k"} == set(models["PredictRequest"]["properties"])
    assert schema["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"][
        "schema"
    ]["$ref"].endswith("/ErrorBody")
    missing = {ref for ref in refs(schema) if ref.split("/")[-1] not in models}
    assert not missing  # every model a route names is in the document
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
