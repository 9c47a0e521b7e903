"""`infopt-pack serve` as a client sees it: one real server process on a tiny GGUF, spoken to
with OpenAI's own Python client and raw HTTP, its answers checked against the same model loaded
in this process. The model has the tiny shape with a 4096-token context, so that a long request
(thousands of tokens) is still running when a test closes it or sends one more."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

KEY = "test-key-123"
MODEL_ID = "tiny"
RUNTIME = "pytorch"
CONTEXT = 4096
SLOTS, MAX_QUEUE = 2, 1
LONG = 4000  # tokens: a request that runs for seconds
LONG_PROMPT = "Hello there"  # a plain prompt the tiny model continues past LONG tokens
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox"},
]
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/health", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def wait_idle(self, timeout: float) -> dict[str, Any]:
        """/health once no request runs or waits; fails after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            health = self.health()
            idle = health["busy"] == health["queued"] == health["in_flight"] == 0
            if idle or time.monotonic() > end:
                assert idle, health
                return health
            time.sleep(0.05)


def _first_line(stream: Any, timeout: float) -> str:
    """The first line the server prints, or "" if it exits or is silent for `timeout` s."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    from tests.conftest import hf_model, write_gguf

    model = hf_model("llama", max_position_embeddings=CONTEXT)
    return write_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("serve") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(long_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    cmd = [sys.executable, "-m", "infopt.cli", "serve", str(long_gguf), "--port", "0"]
    cmd += ["--runtime", RUNTIME, "--context", str(CONTEXT), "--slots", str(SLOTS)]
    cmd += ["--max-queue", str(MAX_QUEUE), "--api-key", KEY, "--model-id", MODEL_ID]
    with log.open("w") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = _first_line(process.stdout, timeout=120)
    if "http://" not in line:
        process.kill()
        pytest.fail(f"the server did not start: {line!r}\n{log.read_text()}")
    url = line.split(" at ")[1].split("/ ")[0]
    server = Server(process, url, log)
    assert server.health()["status"] == "ok"
    yield server
    _stop_while_busy(server)


def _stop_while_busy(server: Server) -> None:
    """Ctrl-C with long requests running: each ends with its [DONE] or, past the grace period,
    an error event saying the server stopped; none is cut short silently."""
    from infopt.serve.server import BACKSTOP_S, GRACE_S

    def last_line(_: int) -> str:
        body = {"prompt": LONG_PROMPT, "max_tokens": LONG, "stream": True}
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as r:
            return r.read().decode().rstrip("\n").rsplit("\n", 1)[-1]

    with ThreadPoolExecutor(SLOTS + MAX_QUEUE) as pool:
        endings = pool.map(last_line, range(SLOTS + MAX_QUEUE))
        end = time.monotonic() + 10
        while server.health()["in_flight"] < SLOTS + MAX_QUEUE and time.monotonic() < end:
            time.sleep(0.02)
        server.process.send_signal(signal.SIGINT)
        for ending in endings:
            assert ending == "data: [DONE]" or "server shut down" in ending, ending
    try:
        server.process.wait(timeout=GRACE_S + BACKSTOP_S + 5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        pytest.fail("the server did not stop after Ctrl-C")
    log = server.log.read_text()  # with the exit status: a silent exit is told apart
    assert "stopped" in log and "Traceback" not in log, (server.process.returncode, log)


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(long_gguf: Path, server: Server) -> Any:
    """The same model in this process."""
    import infopt

    return infopt.load(long_gguf, runtime=RUNTIME, max_context=CONTEXT)


def test_models_and_health(server: Server, client: Any) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    health = server.health()
    assert health["slots"] == SLOTS
    assert health["max_in_flight"] == SLOTS + MAX_QUEUE
    assert health["model"] == MODEL_ID
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200
    assert "chat.js" in page.text
    assert httpx.get(f"{server.url}/static/chat.js", timeout=10).status_code == 200


def test_chat_greedy_matches_generate(client: Any, local: Any) -> None:
    expected = local.generate(CHAT, max_new_tokens=12, temperature=0)
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(local.encode_prompt(CHAT)) == expected.stats.prompt_tokens
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream(client: Any, local: Any) -> None:
    expected = local.generate(CHAT, max_new_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=CHAT,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == expected.stats.prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_stop(client: Any, local: Any) -> None:
    prompt = "Hello world!"
    full = local.generate(prompt, max_new_tokens=16, temperature=0).text
    stop = full[6:8]  # cut the greedy text where this pair of characters first shows
    expected = local.generate(prompt, max_new_tokens=16, temperature=0, stop=stop)
    assert expected.finish_reason == "stop"
    r = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected.text, "stop")
    assert r.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling(client: Any, local: Any) -> None:
    settings = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    texts = [
        client.completions.create(model=MODEL_ID, prompt="Once", **settings).choices[0].text
        for _ in range(2)
    ]
    expected = local.generate("Once", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert texts == [expected.text] * 2


def test_bad_requests(server: Server, client: Any) -> None:
    bad_json = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers=AUTH, timeout=10
    )
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL_ID}, headers=AUTH, timeout=10
    )
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "messages")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=-5)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="x " * (CONTEXT + 8), stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="stop"):  # the library's own check
        client.completions.create(model=MODEL_ID, prompt="Hi", stop=[""])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "robot", "content": "x"}])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="type 'image_url': this model reads text"):
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": [image]}]
        )
    assert server.wait_idle(timeout=5)["cancelled"] == 0


def test_api_key(server: Server) -> None:
    body = {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # no key needed


def _open_stream(http: Any, url: str) -> tuple[Any, Iterator[str]]:
    """A long streaming request left open after its headers and first event, and its lines
    (keep them: httpx closes the response when they are garbage)."""
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG, "stream": True}
    request = http.build_request("POST", f"{url}/v1/completions", json=body, headers=AUTH)
    response = http.send(request, stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return response, lines


def test_disconnect_frees_the_slot(server: Server) -> None:
    before = server.wait_idle(timeout=5)["cancelled"]
    with httpx.Client(timeout=30) as http:
        response, lines = _open_stream(http, server.url)
        assert server.health()["in_flight"] == 1
        assert next(lines) == ""  # the first event's end
        assert next(lines).startswith("data: ")
        response.close()
    health = server.wait_idle(timeout=2)
    # cut, not run to its end (were it not, LONG_PROMPT ended early: the premise is wrong)
    assert health["cancelled"] == before + 1


def test_disconnect_stops_a_whole_answer(server: Server) -> None:
    """A client that gives up on a non-streaming request frees its slot too."""
    before = server.wait_idle(timeout=5)["cancelled"]
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    assert server.wait_idle(timeout=2)["cancelled"] == before + 1


def test_queue_full_is_429(server: Server) -> None:
    before = server.wait_idle(timeout=5)["cancelled"]
    clients = [httpx.Client(timeout=30) for _ in range(SLOTS + MAX_QUEUE)]
    try:
        streams = [_open_stream(http, server.url) for http in clients]
        refused = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": CHAT, "max_tokens": 1},
            headers=AUTH,
            timeout=10,
        )
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        health = server.health()
        assert health["in_flight"] == SLOTS + MAX_QUEUE
        assert health["busy"] + health["queued"] == SLOTS + MAX_QUEUE
        for response, _ in streams:
            response.close()
    finally:
        for http in clients:
            http.close()
    assert server.wait_idle(timeout=5)["cancelled"] == before + SLOTS + MAX_QUEUE


def test_raw_sse_format(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver) for the chat page's browser check",
)
def test_web_chat_page(server: Server, tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    shot = tmp_path / "chat.png"
    cmd = [sys.executable, "-m", "infopt.tools.web_check", server.url, "--api-key", KEY]
    cmd += ["--screenshot", str(shot), "--message", "Hi"]  # a long answer from the tiny model
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert shot.stat().st_size > 1000


def test_structured_output_through_the_api(client: Any, local: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = client.chat.completions.create(
        model=MODEL_ID, messages=CHAT, max_tokens=32, temperature=0, response_format=fmt
    )
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    assert r.choices[0].finish_reason == "stop"
    expected = local.generate(CHAT, max_new_tokens=32, temperature=0, response_format=fmt)
    assert r.choices[0].message.content == expected.text
    regex = client.completions.create(
        model=MODEL_ID, prompt="Say", max_tokens=8, extra_body={"regex": "(red|green|blue)"}
    )
    assert regex.choices[0].text in ("red", "green", "blue")
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL_ID, prompt="Say", extra_body={"regex": "("})


def test_tool_calls_through_the_api(client: Any, local: Any) -> None:
    """OpenAI's client: tools and tool_choice in, `tool_calls` out (whole, and as stream
    deltas), the call and its result sent back as the next turn's history."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
            },
        },
    }
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    settings: dict[str, Any] = {"tools": [tool], "tool_choice": "required", "temperature": 0}
    r = client.chat.completions.create(model=MODEL_ID, messages=ask, max_tokens=120, **settings)
    expected = local.generate(ask, max_new_tokens=120, **settings)
    choice = r.choices[0]
    assert choice.finish_reason == expected.finish_reason
    calls = choice.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.name, c.arguments) for c in expected.tool_calls
    ]
    if expected.finish_reason == "tool_calls":
        assert choice.message.content is None
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    # streamed: each call in a delta of its own, by index
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=ask, max_tokens=120, stream=True, **settings
        )
    )
    streamed: dict[int, Any] = {}
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed[d.index] = (d.function.name, d.function.arguments)
    assert list(streamed.values()) == [(c.function.name, c.function.arguments) for c in calls]
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    # the call and its result fed back: the server renders them and answers
    history = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"celsius": 18}'},
    ]
    after = client.chat.completions.create(
        model=MODEL_ID, messages=history, max_tokens=8, temperature=0, tools=[tool]
    )
    assert after.usage.prompt_tokens == len(local.encode_prompt(history, [tool]))
    with pytest.raises(openai.BadRequestError, match="deprecated"):
        client.chat.completions.create(
            model=MODEL_ID, messages=ask, extra_body={"functions": [tool["function"]]}
        )
    with pytest.raises(openai.BadRequestError, match="chat/completions"):
        client.completions.create(model=MODEL_ID, prompt="Hi", extra_body={"tools": [tool]})
    with pytest.raises(openai.BadRequestError, match="parallel_tool_calls"):
        client.chat.completions.create(
            model=MODEL_ID, messages=ask, tools=[tool], extra_body={"parallel_tool_calls": "yes"}
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=MODEL_ID,
            messages=ask,
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


@contextlib.contextmanager
def _started(cmd: list[str], log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A server process of `cmd` (stderr into `log`) and the first line it prints; stopped
    with SIGTERM on the way out (killed if it lingers past 30 s)."""
    with log.open("w") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield process, _first_line(process.stdout, timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_one_slot_runtime_says_so_at_start(tiny_tflite_bundle: Path, tmp_path: Path) -> None:
    """LiteRT's fixed-shape graph holds one KV state: asked for three slots, the server says it
    grants one (and no "1 slots"), and a note on stderr says where the others wait. SIGTERM, as
    systemd or `docker stop` sends it, stops it as Ctrl-C does: "stopped", status 0."""
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "infopt.cli", "serve", str(tiny_tflite_bundle), "--port", "0"]
    cmd += ["--slots", "3"]
    with _started(cmd, log) as (process, line):
        if "http://" in line:  # up (the note came before): stopped once it answers
            Server(process, line.split(" at ")[1].split("/ ")[0], log).health()
    assert "(tflite, 1 slot) at http://" in line, (line, log.read_text())
    assert "note: tflite takes 1 request at a time" in log.read_text()
    assert "not the 3 of --slots" in log.read_text()
    assert process.returncode == 0 and log.read_text().rstrip().endswith("stopped")


def test_a_context_no_chat_fits_in_is_said_at_start(tiny_gguf: Path, tmp_path: Path) -> None:
    """A context too small for any chat request: the server still starts (short plain
    completions fit) but says at start that chat requests will be refused."""
    import infopt

    local = infopt.load(tiny_gguf, runtime=RUNTIME, max_context=64)
    framing = len(local.tokenizer.encode_chat([{"role": "user", "content": ""}]))
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "infopt.cli", "serve", str(tiny_gguf), "--port", "0"]
    cmd += ["--runtime", RUNTIME, "--context", str(framing + 1)]
    with _started(cmd, log) as (process, line):
        if "http://" in line:
            server = Server(process, line.split(" at ")[1].split("/ ")[0], log)
            body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).is_success
            ask = {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}
            chat = httpx.post(f"{server.url}/v1/chat/completions", json=ask, timeout=30)
            assert chat.status_code == 400, chat.text
    assert "http://" in line, (line, log.read_text())
    note = f"note: the context of {framing + 1} tokens (--context) leaves no room for a chat"
    assert note in log.read_text(), log.read_text()
