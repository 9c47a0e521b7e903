"""Tool calling on the default model (SmolLM2-135M-Instruct, in the APIGen format it was tuned
on): through `generate()` on each CPU runtime, and through `infopt-pack serve` with OpenAI's own
client, the call and its result fed back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import infopt

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
                "to_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "pytorch"])
def test_the_default_model_calls_the_right_tool(gguf_path: Path, runtime: str) -> None:
    m = infopt.load(gguf_path, runtime=runtime, threads=2, max_context=2048)
    assert m.tool_support.format.name == "smollm2"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for settings in ({"temperature": 0}, {"temperature": 0.7, "seed": 1}, {"speculative": "ngram"}):
        r = m.generate(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=96, **settings)
        assert r.finish_reason == "tool_calls" and r.text == "", r
        assert (r.tool_calls[0].name, r.tool_calls[0].args) == ("get_weather", {"city": "Paris"})
        for call in r.tool_calls:
            jsonschema.validate(call.args, schemas[call.name])
    money = [{"role": "user", "content": "Convert 100 US dollars to euros."}]
    r = m.generate(money, tools=TOOLS, tool_choice="required", max_new_tokens=96)
    assert r.tool_calls[0].name == "convert_currency", r
    assert r.tool_calls[0].args["from_currency"] == "USD"
    jsonschema.validate(r.tool_calls[0].args, CONVERT["function"]["parameters"])


def test_tool_calls_with_openai_client_against_the_server(gguf_path: Path) -> None:
    cmd = [sys.executable, "-m", "infopt.cli", "serve", str(gguf_path), "--port", "0"]
    cmd += ["--threads", "2", "--context", "2048"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert "http://" in line, line + (process.stderr.read() if process.stderr else "")
        url = line.split(" at ")[1].split("/ ")[0]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        settings: dict[str, Any] = {"model": model, "tools": TOOLS, "temperature": 0}
        r = client.chat.completions.create(messages=ASK, tool_choice="required", **settings)
        [call] = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason == "tool_calls"
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "get_weather",
            {"city": "Paris"},
        )
        stream = client.chat.completions.create(
            messages=ASK, tool_choice="required", stream=True, **settings
        )
        deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
        # one call, whole in one delta (the same request again reads its prompt from the prefix
        # cache: under fast numerics its greedy text may differ slightly, its validity not)
        [delta] = deltas
        assert (delta.index, delta.function.name) == (0, "get_weather")
        assert isinstance(json.loads(delta.function.arguments)["city"], str)
        # the call and its result go back; the model answers in text (auto: it may call again,
        # but only a call the tools allow)
        history = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18, "sky": "clear"}'},
        ]
        after = client.chat.completions.create(messages=history, max_tokens=48, **settings)
        message = after.choices[0].message
        assert message.content or message.tool_calls
        for c in message.tool_calls or []:
            assert c.function.name in ("get_weather", "convert_currency")
    finally:
        process.terminate()
        process.wait(timeout=60)
