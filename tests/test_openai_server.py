"""Many tenants of one decoder: the continuously batched decoder (`serving.decoding`) and the
OpenAI-compatible routes, on a real uvicorn server on loopback, called with the `openai` client.

The tenants are tiny GPT-2 tasks whose methods' tensors were moved off their start, so every
task's greedy text differs from the base's; each row's greedy tokens must equal its own
artifact's `microtune generate`, whatever rows it shares its decoding steps with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import microtune
from microtune.artifacts.store import save_artifact
from microtune.backbone.load import fingerprint, load_backbone
from microtune.serving.decoding import Decoder, Generation, Sampling
from microtune.serving.multitask import load_many
from microtune.tasks import examples
from microtune.tasks.spec import get_task
from microtune.tasks.types.causal import greedy_generate

from .test_causal_lm import CAUSAL, make_causal_model, task_model
from .test_server import live

# Each method's tasks join the shared lane ("bias", "lora") or their own ("pafi").
METHODS = {
    "slash": None,
    "bitfit": None,
    "hiwi": {"variant": "bias"},
    "lora": None,
    "pafi": {"k": 64},
}
PROMPTS = ["the film is", "a very dull plot , not", "love", "the story was not good and the"]
KEY = {"X-API-Key": "k3y"}
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}the answer is{% endif %}"
)


def task_record() -> dict:
    task = CAUSAL.fit_rows(get_task("causal-lm"), [{"prompt": "a", "response": "b"}], None)
    return examples.task_record(task)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """A tiny GPT-2 with a chat template, and one artifact per method on it."""
    root = tmp_path_factory.mktemp("tenants")
    base = make_causal_model("gpt2", root / "gpt2", tie=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    loaded = load_backbone(str(base), auto_class=CAUSAL.auto_class)
    base_fingerprint = fingerprint(loaded[0])
    folders = {}
    for method, options in METHODS.items():
        model, tokenizer = task_model(base, method, options, perturb=0.3)
        save_artifact(
            root / method,
            model,
            method_name=method,
            base_model=str(base),
            base_fingerprint=base_fingerprint,
            task=task_record(),
            max_length=64,
            tokenizer=tokenizer,
        )
        folders[method] = root / method
    return base, folders


@pytest.fixture(scope="module")
def engine(tenants):
    return load_many(tenants[1])


@pytest.fixture(scope="module")
def expected(tenants):
    """Each task's own `microtune generate` (greedy, 12 tokens) of every prompt."""
    return {
        method: [r["response"] for r in microtune.load(folder).generate(PROMPTS, 12)]
        for method, folder in tenants[1].items()
    }


def base_greedy(base, prompts: list[str], tokens: int) -> list[str]:
    """The bare base's greedy text by transformers' own `generate`, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # no token types: GPT-2 adds them
        mask = torch.ones_like(ids)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


def wait_for(rows: list[Generation], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not all(row.done for row in rows):
        assert time.monotonic() < deadline, "decoding did not finish"
        time.sleep(0.01)


def test_every_row_of_a_mixed_batch_gives_its_own_tasks_greedy_tokens(engine, tenants, expected):
    """SLaSh, BitFit, HiWi (bias), LoRA, PaFi and the bare base in one decoder; half the rows
    join while the first half is decoding (spliced into the running cache)."""
    steps: list[int] = []
    decoder = Decoder(engine, 64)
    decoder.observer.step = steps.append
    tokenizer = engine.base.tokenizer
    rows = []
    for method in [*METHODS, None]:
        task = engine.tasks[method] if method else None
        for prompt in PROMPTS:
            ids = tokenizer(prompt).input_ids
            rows.append((method, prompt, Generation(task, ids, 12)))
    first, second = rows[::2], rows[1::2]
    for *_, row in first:
        decoder.submit(row)
    while not any(row.tokens for *_, row in first):
        time.sleep(0.001)
    for *_, row in second:
        decoder.submit(row)
    wait_for([row for *_, row in rows])
    decoder.close()
    base = dict(zip(PROMPTS, base_greedy(tenants[0], PROMPTS, 12), strict=True))
    for method, prompt, row in rows:
        want = expected[method][PROMPTS.index(prompt)] if method else base[prompt]
        assert row.text == want, (method, prompt)
        assert row.error is None and row.finish_reason in ("stop", "length")
    shared = len(PROMPTS) * 5  # slash, bitfit, hiwi, lora and the base share one lane
    assert max(steps) > len(PROMPTS) * 2 and max(steps) <= shared
    assert len({row.text for _, prompt, row in rows if prompt == PROMPTS[0]}) > 3  # tasks differ


def test_sampling_is_per_row_and_reproducible_with_its_seed(engine):
    tokenizer = engine.base.tokenizer
    ids = tokenizer(PROMPTS[0]).input_ids
    decoder = Decoder(engine, 8)

    def sample(seed: int, task: str = "slash") -> str:
        rows = [
            Generation(engine.tasks[task], ids, 16, sampling=Sampling(1.5, 0.95, seed)),
            Generation(engine.tasks["lora"], ids, 16),  # a greedy neighbour in the batch
        ]
        for row in rows:
            decoder.submit(row)
        wait_for(rows)
        return rows[0].text

    try:
        assert sample(1) == sample(1)
        assert len({sample(seed) for seed in range(4)}) > 1
    finally:
        decoder.close()


def test_a_stop_string_ends_the_text_before_it(engine, expected):
    full = expected["slash"][1]
    stop = full.split()[2]
    row = Generation(engine.tasks["slash"], engine.base.tokenizer(PROMPTS[1]).input_ids, 12)
    row.stop = (stop,)
    decoder = Decoder(engine, 8)
    decoder.submit(row)
    wait_for([row])
    decoder.close()
    assert row.finish_reason == "stop" and row.text == full[: full.index(stop)]


@pytest.fixture(scope="module")
def server(engine):
    with live(engine, api_key="k3y", max_new_tokens=40) as (client, http_server):
        url = str(client.base_url)
        yield client, openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)


def test_completions_and_chat_through_the_openai_client(server, engine, expected, tenants):
    _, client = server
    for method in METHODS:
        answer = client.completions.create(
            model=method, prompt=PROMPTS, max_tokens=12, temperature=0
        )
        assert [c.text for c in answer.choices] == expected[method]
        assert answer.usage.prompt_tokens == sum(
            len(engine.base.tokenizer(p).input_ids) for p in PROMPTS
        )
        assert {c.finish_reason for c in answer.choices} <= {"stop", "length"}
    chat = client.chat.completions.create(
        model="slash", messages=[{"role": "user", "content": "the film"}], temperature=0
    )
    tokenizer = engine.base.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the film"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids  # the template's own tokens
    own = microtune.load(tenants[1]["slash"]).task_model
    want = greedy_generate(own, [ids], 40, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    assert chat.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert chat.usage.completion_tokens >= 1


def test_a_stream_sends_the_same_text_in_events_ending_in_done(server, expected):
    http, client = server
    stream = client.completions.create(
        model="lora",
        prompt=PROMPTS[3],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["lora"][3]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    raw = http.post(
        "/v1/chat/completions",
        json={"model": "slash", "messages": [{"role": "user", "content": "love"}], "stream": True},
        headers={"Authorization": "Bearer k3y"},
    )
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_two_tasks_requests_share_decoding_steps(server, engine, expected):
    """Two requests of two tasks at once (a slowed base, 0.05 s a step, so that they overlap):
    the decoding steps of both rows at once show in the rows-per-step histogram of /metrics."""
    http, client = server
    before = step_histogram(http)

    def ask(model: str) -> None:
        texts = expected[model]  # its longest greedy answer: no early EOS
        prompt = PROMPTS[max(range(len(PROMPTS)), key=lambda i: len(texts[i].split()))]
        client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("slash", "lora")]
    slow = engine.body.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        slow.remove()
    after = step_histogram(http)
    shared = (after["+Inf"] - after["1.0"]) - (before["+Inf"] - before["1.0"])
    assert shared >= 2  # steps that decoded a row of each task


def step_histogram(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics", headers={"X-API-Key": "k3y"}).text
    buckets = {}
    for line in text.splitlines():
        if line.startswith("microtune_decode_step_rows_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[bound] = float(line.rsplit(" ", 1)[1])
    return buckets


def test_a_client_that_disconnects_frees_its_row(server, engine):
    """A slowed base (50 ms a step): a stream read for one event, then closed; the row leaves
    the batch at the next step, so far fewer of its tokens are decoded than the whole answer
    has (measured first), in the time the whole answer would have taken."""
    http, client = server
    body = {"model": "slash", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0}
    whole = client.completions.create(**body).usage.completion_tokens
    assert whole >= 10
    slow = engine.body.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        before = tokens_decoded(http)
        stream = {**body, "stream": True}
        with http.stream("POST", "/v1/completions", json=stream, headers=KEY) as response:
            next(response.iter_lines())  # the first event: the row is decoding
        time.sleep(0.05 * whole + 1.0)  # the whole answer's steps, had the row stayed
        decoded = tokens_decoded(http) - before
    finally:
        slow.remove()
    assert 1 <= decoded <= whole // 2


def served_tokens(url: str) -> float:
    with httpx.Client(base_url=url, timeout=20) as http:
        return tokens_decoded(http, {})


def tokens_decoded(http: httpx.Client, headers: dict = KEY) -> float:
    text = http.get("/metrics", headers=headers).text
    line = next(x for x in text.splitlines() if x.startswith("microtune_generated_tokens_total"))
    return float(line.rsplit(" ", 1)[1])


def test_models_lists_every_task_with_the_base_as_parent(server, tenants):
    _, client = server
    cards = {m.id: m for m in client.models.list().data}
    base = str(tenants[0])
    assert set(cards) == {base, *METHODS}
    assert all(cards[m].parent == base for m in METHODS) and cards[base].parent is None
    answer = client.completions.create(model=base, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert answer.choices[0].text == base_greedy(tenants[0], PROMPTS[:1], 6)[0]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "nope", "prompt": "the"}, 404, "GET /v1/models"),
        ({"model": "slash", "prompt": "the", "temperature": True}, 400, "temperature"),
        ({"model": "slash", "prompt": "the", "best_of": 2}, 400, "best_of"),
        ({"model": "slash", "prompt": "the", "n": 2}, 400, '"n"'),
        ({"model": "slash", "prompt": "the", "max_tokens": 41}, 400, "--max-new-tokens"),
        ({"model": "slash", "prompt": "the " * 70}, 400, "over this model's 64"),
        ({"model": "slash", "prompt": []}, 400, "empty list"),
        ({"model": "slash", "prompt": "the", "stop": ["a"] * 5}, 400, "up to 4"),
    ],
)
def test_every_refusal_is_a_4xx_in_openais_shape(server, body, status, says):
    http, _ = server
    answer = http.post("/v1/completions", json=body, headers={"X-API-Key": "k3y"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert says in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_the_openai_client_raises_its_own_errors(server):
    http, client = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="the")
    with pytest.raises(openai.BadRequestError, match="over this model's 64") as refused:
        client.completions.create(model="slash", prompt="the " * 70)
    assert refused.value.code == "context_length_exceeded"
    url = str(http.base_url)
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_a_chat_needs_a_chat_template(tmp_path, tenants):
    base = make_causal_model("gpt2", tmp_path / "plain", tie=True)
    folder = tmp_path / "plain-task"
    model, tokenizer = task_model(base, "slash", None, perturb=0.3)
    save_artifact(
        folder,
        model,
        method_name="slash",
        base_model=str(base),
        base_fingerprint=fingerprint(load_backbone(str(base), auto_class=CAUSAL.auto_class)[0]),
        task=task_record(),
        max_length=64,
        tokenizer=tokenizer,
    )
    with live(load_many([folder])) as (http, _):
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "plain-task", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert answer.status_code == 400 and "chat template" in answer.json()["error"]["message"]


def test_shutdown_and_a_deleted_task_answer_in_flight_rows_at_once(engine):
    """A closing decoder (SIGTERM) and a task deleted mid-generation end their rows at the
    next step, each with its reason, never left waiting for the longest generation."""
    ids = engine.base.tokenizer(PROMPTS[0]).input_ids
    decoder = Decoder(engine, 8)
    long = Generation(engine.tasks["slash"], ids, 10_000)
    decoder.submit(long)
    while not long.tokens:
        time.sleep(0.001)
    started = time.monotonic()
    decoder.close("the server is shutting down; send the request again")
    assert long.error and "shutting down" in long.error
    assert time.monotonic() - started < 5
    with pytest.raises(microtune.MicrotuneError, match="shutting down"):
        decoder.submit(Generation(None, ids, 4))


def test_openapi_describes_the_routes_and_docs_are_served(server):
    http, _ = server
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert "max_tokens" in schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]
    assert http.get("/docs").status_code == 200


def test_the_guides_openai_snippet_runs_against_a_live_server(tenants, expected, capsys):
    guide = (Path(__file__).parents[1] / "docs" / "guides" / "many-tasks.md").read_text()
    snippet = re.search(r"<!-- openai-snippet -->\n```python\n(.*?)```", guide, re.S).group(1)
    with live(load_many({"echo": tenants[1]["slash"]})) as (http, _):
        exec(snippet.replace("http://127.0.0.1:8000", str(http.base_url)), {})
    printed = capsys.readouterr().out.splitlines()
    assert "echo" in printed[0] and str(tenants[0]) in printed[0]
    greedy = microtune.load(tenants[1]["slash"]).generate(PROMPTS[:1], 8)[0]["response"]
    assert printed[1].startswith(greedy)


def test_a_request_of_many_long_rows_leaves_room_for_a_short_one(engine):
    """A request of 8 long rows on a batch of 4 (a slowed base): a 2-token request sent after
    it is decoded while the long rows still run, not after them (no head-of-line blocking)."""
    ids = engine.base.tokenizer(PROMPTS[0]).input_ids
    decoder = Decoder(engine, 4)
    decoder.eos = None
    big = object()
    long = [Generation(engine.tasks["slash"], ids, 40, request=big) for _ in range(8)]
    short = Generation(engine.tasks["lora"], ids, 2)
    slow = engine.body.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    try:
        for row in long:
            decoder.submit(row)
        while not long[0].tokens:
            time.sleep(0.001)
        decoder.submit(short)
        wait_for([short])
        assert sum(row.done for row in long) == 0  # the short one finished first
        assert sum(bool(row.tokens) for row in long) == 3  # its share: 3 of the 4 rows
        wait_for(long)
    finally:
        slow.remove()
        decoder.close()


SLOW_SERVE = """
import runpy, sys, time
from torch.nn.modules.module import register_module_forward_pre_hook
# 20 ms a decoding step of the tiny GPT-2, so that a generation is still running at SIGTERM
register_module_forward_pre_hook(
    lambda module, args: time.sleep(0.02) if type(module).__name__ == "GPT2Model" else None
)
sys.argv = ["microtune", *sys.argv[1:]]
runpy.run_module("microtune", run_name="__main__")
"""


def long_greedy_answer(folders: dict) -> tuple[str, str]:
    """A (task, prompt) whose greedy answer runs to the end of the task's 64 positions without
    EOS (word-level tiny vocabulary: a word is a token), so that it is still decoding later."""
    for method in ("slash", "lora", "bitfit"):
        answers = microtune.load(folders[method]).generate(PROMPTS, 64)
        for answer in answers:
            if len(answer["response"].split()) >= 50:
                return method, answer["prompt"]
    raise AssertionError("no greedy answer of 50 tokens among the tiny tenants")


def test_sigterm_ends_a_long_generation_at_once_with_a_clean_503(tenants, tmp_path):
    """`microtune serve` (a real process, its base slowed) with a long /v1/completions in
    flight: SIGTERM makes the server answer it 503 in one line and exit within seconds, with no
    traceback, instead of waiting for the generation to end."""
    method, prompt = long_greedy_answer(tenants[1])
    folder = str(tenants[1][method])
    command = [sys.executable, "-c", SLOW_SERVE, "serve", "--artifacts", folder, "--port", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [*command, "--max-new-tokens", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    answers = []
    try:
        url = json.loads(process.stdout.readline())["serving"]
        body = {"model": method, "prompt": prompt, "max_tokens": 1000, "temperature": 0}
        ask = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            )
        )
        ask.start()
        deadline = time.monotonic() + 60
        while served_tokens(url) < 3:  # decoding (its 59 steps take 1.2 s at least)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        ask.join(30)
        # uvicorn re-raises the signal once it has shut down: the exit says "ended by SIGTERM"
        assert process.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - started < 15
    finally:
        process.kill()
    assert answers[0].status_code == 503, answers[0].text
    assert "shutting down" in answers[0].json()["error"]["message"]
    assert "Traceback" not in process.stderr.read()


def test_the_queue_bound_covers_the_openai_routes(engine, expected):
    """--max-queue 1 and a slowed base (0.1 s a step): a second request while the first decodes
    (its 12 tokens, no EOS among them) is a 503 in OpenAI's shape with Retry-After."""
    method, prompt = max(
        ((m, p) for m in ("slash", "lora") for p in PROMPTS),
        key=lambda pair: len(expected[pair[0]][PROMPTS.index(pair[1])].split()),
    )
    slow = engine.body.register_forward_pre_hook(lambda *_: time.sleep(0.1))
    body = {"model": method, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    try:
        with live(engine, max_queue=1) as (http, _):
            first = threading.Thread(target=lambda: http.post("/v1/completions", json=body))
            first.start()
            while tokens_decoded(http, {}) < 1:  # the first one holds the only place
                time.sleep(0.02)
            second = http.post("/v1/completions", json=body)
            first.join(30)
    finally:
        slow.remove()
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "server_error"
    assert "queue is full" in second.json()["error"]["message"]
