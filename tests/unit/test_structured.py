"""Structured output (llguidance's token masks in the shared generate loop): the output follows
the schema, regex or grammar on every runtime and inside a batch; bad constraints are typed
errors before any work."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import infopt
from infopt.cli import main
from infopt.decode.constraints import grammar_for

ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["answer", "n"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), ANSWER)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch", "openvino"])
def test_schema_regex_and_grammar_hold_on_every_runtime(load_tiny: Any, runtime: str) -> None:
    m = load_tiny(runtime, 128)
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        r = m.generate("Answer:", max_new_tokens=40, response_format=FORMAT, **settings)
        assert r.finish_reason == "stop" and valid(r.text), r.text
        r = m.generate("Colour:", max_new_tokens=8, regex=r"(red|green|blue)", **settings)
        assert r.finish_reason == "stop" and r.text in ("red", "green", "blue")
        lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'
        r = m.generate("Tuple:", max_new_tokens=24, grammar=lark, **settings)
        assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", r.text) or r.finish_reason == "length"
    # llama.cpp's GBNF is converted
    r = m.generate("Answer:", max_new_tokens=4, grammar='root ::= "yes" | "no"', temperature=0)
    assert r.text in ("yes", "no")


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_constrained_output_speculates_losslessly(load_tiny: Any, runtime: str) -> None:
    """Prompt-lookup drafts (the prompt repeats what the answer must say) are checked against
    the grammar and verified under its masks: greedy output is the one without a draft."""
    m = load_tiny(runtime, 256)
    prompt = 'Answer: {"answer":"yes","n":7} {"answer":"yes","n":7} {"answer":"yes","n":7}'
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        plain = m.generate(prompt, max_new_tokens=40, response_format=FORMAT, **settings)
        spec = m.generate(
            prompt, max_new_tokens=40, response_format=FORMAT, speculative="ngram", **settings
        )
        assert valid(spec.text) and spec.finish_reason == "stop", spec.text
        assert spec.stats.speculative is not None
        if settings["temperature"] == 0:
            assert spec.token_ids == plain.token_ids
    greedy = m.generate(prompt, max_new_tokens=40, response_format=FORMAT, speculative="ngram")
    assert greedy.stats.speculative is not None and greedy.stats.speculative.drafted > 0


def test_constrained_requests_batched_with_free_ones(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=128, slots=4)
    alone = m.generate("Answer:", max_new_tokens=40, response_format=FORMAT, temperature=0)
    free = m.generate("hello there", max_new_tokens=20, stop_token_ids=[], temperature=0)
    out: dict[int, Any] = {}

    def run(i: int) -> None:
        if i % 2:
            out[i] = m.generate("hello there", max_new_tokens=20, stop_token_ids=[], temperature=0)
        else:
            out[i] = m.generate("Answer:", max_new_tokens=40, response_format=FORMAT, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i].text for i in range(4)] == [alone.text, free.text] * 2
    assert valid(alone.text) and m.engine.largest_batch >= 2


def test_a_json_object_and_a_closed_schema(load_tiny: Any) -> None:
    m = load_tiny("onnxruntime", 128)
    r = m.generate("{", max_new_tokens=60, response_format={"type": "json_object"}, temperature=0)
    assert r.finish_reason == "length" or isinstance(json.loads(r.text), dict)
    # objects that do not say otherwise take no other keys (OpenAI's strict outputs)
    assert json.loads(grammar_for(FORMAT) or "")  # a grammar llguidance validated
    schema_text = json.dumps(json.loads(grammar_for(FORMAT) or "{}"))
    assert '"additionalProperties": false' in schema_text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"regex": "("}, r"^regex '\(': unclosed group$"),
        ({"regex": ""}, "regex=''"),
        ({"grammar": "start: ("}, "grammar"),
        ({"response_format": {"type": "xml"}}, "response_format type 'xml'"),
        ({"response_format": "json"}, "response_format='json'"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "json_schema", "schema": {"type": 5}}}, "response_format"),
        ({"regex": "a", "grammar": 'start: "a"'}, "at most one"),
    ],
)
def test_bad_constraints_are_typed_errors_before_any_work(
    load_tiny: Any, settings: dict[str, Any], message: str
) -> None:
    m = load_tiny("onnxruntime", 64)
    before = m.runtime.changes
    with pytest.raises(infopt.InvalidArgumentError, match=message):
        m.stream("hi", max_new_tokens=4, **settings)
    assert m.runtime.changes == before and m.status()["queued"] == 0


def test_run_takes_a_schema_file_a_regex_and_a_grammar(tiny_gguf: Path, tmp_path: Path) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(ANSWER))
    base = ["run", str(tiny_gguf), "--runtime", "onnxruntime", "--prompt", "Answer:", "--json"]
    r = CliRunner().invoke(main, [*base, "--json-schema", str(schema), "-n", "40"])
    assert r.exit_code == 0, r.output
    assert valid(json.loads(r.stdout.strip().splitlines()[-1])["text"])
    r = CliRunner().invoke(main, [*base, "--regex", "(red|green)", "-n", "8"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["text"] in ("red", "green")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    r = CliRunner().invoke(main, [*base, "--json-schema", str(bad)])
    assert r.exit_code == 2 and "not JSON" in r.output
    r = CliRunner().invoke(main, [*base, "--regex", "("])  # refused before the model loads
    assert r.exit_code == 2 and "unclosed group" in r.output and "--regex" in r.output
    r = CliRunner().invoke(main, [*base, "--regex", "a", "--json-schema", str(schema)])
    assert r.exit_code == 2 and "--json-schema and --regex" in r.output
