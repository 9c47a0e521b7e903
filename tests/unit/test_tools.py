"""Tool calling: tools shown through the chat template (or the model's own call format), calls
constrained to the tools' schemas once started, parsed into `ToolCall`s, split out of streamed
text, and fed back as tool turns; bad tools are typed errors before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import infopt
from infopt.core.tokenizer import Tokenizer
from infopt.decode.constraints import Constraint, tokenizer_view
from infopt.decode.generate import Response, Stats
from infopt.decode.tools import (
    CallSplitter,
    Hermes,
    JsonCall,
    SmolLM2,
    ToolCall,
    ToolFormat,
    check_tools,
    marker_tokens,
    split_calls,
    tool_grammar,
    tool_messages,
    tool_support,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORMATS = [Hermes(), SmolLM2(), JsonCall()]


@pytest.fixture(scope="module")
def tool_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """The tiny model with room for a tool prompt (the tiny tokenizer spends many tokens on
    it)."""
    from tests.conftest import hf_model, write_gguf

    model = hf_model("llama", max_position_embeddings=1536)
    return write_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("tools") / "tiny.gguf")


@pytest.fixture(scope="module")
def tok(tiny_gguf: Path) -> Tokenizer:
    """The tiny model's tokenizer (a plain ChatML template: no tool support of its own)."""
    from infopt.importers import open_model

    return open_model(tiny_gguf).tokenizer


def valid_call(call: ToolCall) -> bool:
    try:
        jsonschema.validate(call.args, SCHEMAS[call.name])
    except (KeyError, jsonschema.ValidationError):
        return False
    return True


def accepts(tok: Tokenizer, grammar: str, text: str) -> bool:
    c = Constraint(grammar, tokenizer_view(tok, tok.vocab_size))
    ids = tok.encode(text, add_special_tokens=False)
    return c.valid_prefix(ids) == len(ids)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_format_constrains_a_started_call_to_the_tools(
    fmt: ToolFormat, tok: Tokenizer
) -> None:
    tools = check_tools(TOOLS)
    call = fmt.call_text([("get_weather", {"city": "Paris"})])
    auto, required = tool_grammar(fmt, tools, False), tool_grammar(fmt, tools, True)
    assert accepts(tok, auto, call) and accepts(tok, required, call)
    assert accepts(tok, auto, "No tool fits.")  # text is free until a call starts
    assert not accepts(tok, required, "No tool fits.")
    for wrong in (
        [("get_time", {"city": "Paris"})],  # no such tool
        [("get_weather", {})],  # a required argument missing
        [("add", {"a": 1, "b": "2"})],  # a string for an integer
        [("get_weather", {"city": "Paris", "unit": "kelvin"})],  # not in the enum
        [("get_weather", {"city": "Paris", "when": "now"})],  # no such argument
    ):
        text = fmt.call_text(wrong)
        assert not accepts(tok, auto, text) and not accepts(tok, required, text)
    # the layout the model was tuned on: ", " and ": ", nothing looser or tighter
    assert not accepts(tok, required, call.replace(": ", ":"))
    # one call per answer unless parallel calls are asked for
    two = fmt.call_text([("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})])
    if not isinstance(fmt, JsonCall):
        assert not accepts(tok, required, two) and not accepts(tok, auto, two)
        for req in (False, True):
            assert accepts(tok, tool_grammar(fmt, tools, req, parallel=True), two)
    if fmt.bare:  # an answer that opens with "{" is a call, held to the tools
        assert accepts(tok, auto, json.dumps({"name": "add", fmt.arguments_key: {"a": 1, "b": 2}}))
        assert not accepts(tok, auto, '{"name": "nope"')
    if fmt.end:  # text before a call is free; the call after it is still held to the tools
        assert accepts(tok, auto, "Let me check. " + call)
        assert not accepts(tok, auto, "Let me check. " + fmt.trigger + '\n{"nam": 1}')


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_calls_are_split_out_of_text_arriving_in_any_pieces(fmt: ToolFormat) -> None:
    calls = [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    if isinstance(fmt, JsonCall):  # one call, as the whole answer
        answers = [(fmt.call_text(calls[:1]), "", calls[:1])]
    else:
        text = "Sure. " + fmt.call_text(calls) + " Done."
        blocks = re.escape(fmt.trigger) + ".*?" + re.escape(fmt.end)
        content = re.sub(blocks, "", text, flags=re.S)  # what lies between calls stays
        answers = [(text, content, calls), ("a < b <tool", "a < b <tool", [])]
    if isinstance(fmt, Hermes):  # a bare call, without markers, as the whole answer
        bare = json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})
        answers.append((bare, "", [("add", {"a": 1, "b": 2})]))
        # after a space it is text, as the grammar leaves it: never taken for a call
        answers.append((" " + bare, " " + bare, []))
    if fmt.end:  # the end marker inside an argument's text does not end the call
        tricky = [("send_email", {"to": "a@b.c", "subject": f"x{fmt.end}y", "body": fmt.end})]
        answers.append((fmt.call_text(tricky), "", tricky))
    answers.append(("Just text, no call {here}.", "Just text, no call {here}.", []))
    for text, content, expected in answers:
        for size in (1, 3, 1000):
            splitter = CallSplitter(fmt)
            out, made = "", []
            for i in range(0, len(text), size):
                piece, new = splitter.push(text[i : i + size])
                out, made = out + piece, made + new
                assert fmt.trigger not in piece or not expected  # a call never leaks as text
            rest, last = splitter.finish()
            out, made = out + rest, made + last
            assert out == content and [(c.name, c.args) for c in made] == expected, (size, text)


def test_a_call_cut_short_stays_text_and_the_finish_reason_says_why() -> None:
    fmt = Hermes()
    text = 'Checking <tool_call>\n{"name": "get_weather", "argum'
    pieces = [Response(text[:5], 1, None, Stats()), Response(text[5:], 2, "length", Stats())]
    out = list(split_calls(iter(pieces), fmt))
    assert "".join(r.text for r in out) == text and not any(r.tool_calls for r in out)
    assert out[-1].finish_reason == "length"
    done = fmt.call_text([("add", {"a": 1, "b": 2})])
    out = list(split_calls(iter([Response(done, 3, "stop", Stats())]), fmt))
    assert out[-1].finish_reason == "tool_calls" and out[-1].tool_calls[0].name == "add"


def test_the_format_is_read_off_the_template(tok: Tokenizer) -> None:
    from dataclasses import replace

    def support(template: str, arch: str = "llama") -> tuple[str, bool]:
        s = tool_support(replace(tok, chat_template=template), arch)
        return s.format.name, s.native

    hermes = "{{ tools | tojson }}{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}"
    llama = '{% if tools %}{"name": function name, "parameters": ...}{% endif %}{{ messages }}'
    smol = "{{ 'You are a helpful AI assistant named SmolLM' }}{{ messages }}"
    assert support(hermes) == ("hermes", True)
    assert support(llama) == ("json", True)
    assert support(smol) == ("smollm2", False)
    assert support("<start_of_turn>{{ messages }}", "gemma3") == ("json", False)
    assert support(tok.chat_template or "") == ("hermes", False)  # plain ChatML


def test_tool_turns_are_written_as_the_template_takes_them(tok: Tokenizer) -> None:
    call = ToolCall("get_weather", '{"city": "Paris"}')
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'},
    ]
    tools = check_tools(TOOLS)
    # without tool support: the tools in the system turn, the call and its result as text
    messages, variables = tool_messages(history, tools, tool_support(tok, "llama"))
    assert variables == {} and messages[0]["role"] == "system"
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": Hermes().call_text([call_args(call)])}
    assert messages[3] == {
        "role": "user",
        "content": '<tool_response>\n{"celsius": 18}\n</tool_response>',
    }
    text = tok.render_chat(messages)
    assert text.endswith(
        f"{Hermes().call_text([call_args(call)])}<|im_end|>\n<|im_start|>user\n<tool_response>"
        '\n{"celsius": 18}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    # a template that renders tools: given `tools`, and each call's arguments as a mapping
    native = tool_support(tok, "llama")
    native = type(native)(native.format, True)
    messages, variables = tool_messages(history, tools, native)
    assert variables == {"tools": tools} and messages[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        history[2],
    ]


def call_args(call: ToolCall) -> tuple[str, dict[str, Any]]:
    return call.name, call.args


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_a_model_calls_tools_through_generate_and_stream(tool_gguf: Path, runtime: str) -> None:
    m = infopt.load(tool_gguf, runtime=runtime, max_context=1536)
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 4}):
        r = m.generate(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=200, **settings)
        assert (r.finish_reason, r.text, len(r.tool_calls)) == ("tool_calls", "", 1), r
        assert valid_call(r.tool_calls[0])
        named = {"type": "function", "function": {"name": "add"}}
        r = m.generate(ASK, tools=TOOLS, tool_choice=named, max_new_tokens=200, **settings)
        assert [c.name for c in r.tool_calls] == ["add"] and valid_call(r.tool_calls[0])
        # parallel calls: a random model may call again and again; cut by max_new_tokens, its
        # complete calls still come out and the one cut short stays text
        r = m.generate(
            ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=True,
            max_new_tokens=200,
            **settings,
        )
        assert r.tool_calls and all(valid_call(c) for c in r.tool_calls), r
        assert r.finish_reason in ("tool_calls", "length")
    # streamed: the calls come as deltas of their own, the same as generate's
    whole = m.generate(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=200)
    stream = m.stream(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=200)
    deltas = []
    while (d := stream.next_delta()) is not None:
        deltas.append(d)
    got = [(c.name, c.arguments) for d in deltas for c in d.tool_calls]
    assert got == [(c.name, c.arguments) for c in whole.tool_calls]
    assert stream.result is not None and stream.result.finish_reason == "tool_calls"
    # speculation keeps the constrained call token for token (greedy)
    spec = m.generate(
        ASK, tools=TOOLS, tool_choice="required", max_new_tokens=200, speculative="ngram"
    )
    if runtime == "pytorch":  # its verify pass computes as single steps do
        assert spec.token_ids == whole.token_ids
    assert all(valid_call(c) for c in spec.tool_calls)
    # "none": the tools are not shown and nothing is parsed
    none = m.generate(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=8)
    assert none.tool_calls == [] and none.finish_reason in ("stop", "length")
    assert m.encode_prompt(ASK, TOOLS, "none") == m.encode_prompt(ASK)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tools": []}, "tools=\\[\\]"),
        ({"tools": [{"type": "retrieval"}]}, "only 'function'"),
        ({"tools": [{"function": {"name": "a b"}}]}, "name 'a b'"),
        ({"tools": [WEATHER, WEATHER]}, "two tools"),
        ({"tools": [{"function": {"name": "f", "parameters": {"type": "array"}}}]}, "'object'"),
        (
            {"tools": [{"function": {"name": "f", "parameters": {"properties": {"x": 5}}}}]},
            "'f' parameters",
        ),
        ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice='any'"),
        ({"tools": TOOLS, "tool_choice": {"function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "without tools"),
        ({"tools": TOOLS, "regex": "a"}, "one or the other"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls='yes'"),
        ({"parallel_tool_calls": True}, "without tools"),
    ],
)
def test_bad_tools_are_typed_errors_before_any_work(
    load_tiny: Any, settings: dict[str, Any], message: str
) -> None:
    m = load_tiny("onnxruntime", 64)
    before = m.runtime.changes
    with pytest.raises(infopt.InvalidArgumentError, match=message):
        m.stream(ASK, max_new_tokens=4, **settings)
    with pytest.raises(infopt.InvalidArgumentError, match="chat messages"):
        m.stream("hi", max_new_tokens=4, tools=TOOLS)
    assert m.runtime.changes == before and m.status()["queued"] == 0


def test_tool_call_dicts_are_openai_shaped() -> None:
    call = ToolCall("add", json.dumps({"a": 1, "b": 2}))
    d = call.to_dict()
    assert d["type"] == "function" and d["id"].startswith("call_")
    assert json.loads(d["function"]["arguments"]) == {"a": 1, "b": 2}


def test_markers_that_are_tokens_of_their_own(tok: Tokenizer) -> None:
    """Qwen's `<tool_call>` is an added token: llguidance takes it as special, so the grammar
    names it by id, and the model's one token opens the call (the text spelled out in pieces
    does not)."""
    from dataclasses import replace

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tok.backend.to_str())
    backend.add_tokens([AddedToken(t, special=False) for t in ("<tool_call>", "</tool_call>")])
    qwen = replace(tok, backend=backend)
    view = tokenizer_view(qwen, qwen.vocab_size)
    marks = marker_tokens(Hermes(), qwen, view)
    assert set(marks) == {"<tool_call>", "</tool_call>"}
    tools = check_tools(TOOLS)
    call = Hermes().call_text([("add", {"a": 1, "b": 2})])
    for required in (False, True):
        grammar = tool_grammar(Hermes(), tools, required, marks)
        c = Constraint(grammar, view)
        ids = qwen.encode(("" if required else "Sure. ") + call, add_special_tokens=False)
        assert marks["<tool_call>"] in ids and c.valid_prefix(ids) == len(ids)
    wrong = qwen.encode('Sure. <tool_call>\n{"name": "nope"', add_special_tokens=False)
    c = Constraint(tool_grammar(Hermes(), tools, False, marks), view)
    assert c.valid_prefix(wrong) < len(wrong)
    # text may not spell the marker out in pieces (the splitter would take it for a call)
    spelled = [t for part in ("Sure. <tool", "_call>") for t in qwen.encode(part, False)]
    assert marks["<tool_call>"] not in spelled
    c = Constraint(tool_grammar(Hermes(), tools, False, marks), view)
    assert c.valid_prefix(spelled) < len(spelled)


def test_qwen_s_own_template_renders_the_tools_and_the_call_layout_the_grammar_holds(
    tok: Tokenizer,
) -> None:
    """Qwen2.5's template (read out of a real Qwen2.5 GGUF) renders the tools itself; the call
    it writes into the history is, byte for byte, the layout the grammar holds a new call to."""
    from dataclasses import replace

    template = (Path(__file__).parents[1] / "data/templates/qwen2.5-instruct.jinja").read_text()
    qwen = replace(tok, chat_template=template)
    support = tool_support(qwen, "qwen2")
    assert (support.format.name, support.native) == ("hermes", True)
    tools = check_tools(TOOLS)
    messages, variables = tool_messages(ASK, tools, support)
    text = qwen.render_chat(messages, **variables)
    assert "<tools>\n" + json.dumps(tools[0], ensure_ascii=False) + "\n" in text
    call = ToolCall("get_weather", '{"city": "Paris"}')
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'},
    ]
    messages, variables = tool_messages(history, tools, support)
    text = qwen.render_chat(messages, **variables)
    written = Hermes().call_text([("get_weather", {"city": "Paris"})])
    assert f"<|im_start|>assistant\n{written}<|im_end|>\n" in text
    assert '<|im_start|>user\n<tool_response>\n{"celsius": 18}\n</tool_response><|im_end|>' in text
    assert accepts(tok, tool_grammar(Hermes(), tools, True), written)


def test_bad_tool_turns_are_typed_errors(tool_gguf: Path) -> None:
    m = infopt.load(tool_gguf, runtime="onnxruntime", max_context=1536)
    bad = [
        ({"role": "assistant", "content": None, "tool_calls": "abc"}, "expected a list"),
        ({"role": "tool", "tool_call_id": "x", "content": {"celsius": 18}}, "must be a string"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
            "not JSON",
        ),
    ]
    for turn, message in bad:
        with pytest.raises(infopt.InvalidArgumentError, match=message):
            m.generate([*ASK, turn], tools=TOOLS, max_new_tokens=4)


def test_run_takes_tools_from_a_file(tool_gguf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infopt.cli import main

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    base = ["run", str(tool_gguf), "--runtime", "pytorch", "--context", "1536"]
    base += ["--prompt", "What is the weather in Paris?", "--tools", str(tools)]
    r = CliRunner().invoke(main, [*base, "--tool-choice", "add", "--max-new-tokens", "200"])
    assert r.exit_code == 0, r.output
    calls = [line for line in r.output.splitlines() if line.startswith("call ")]
    assert len(calls) == 1 and calls[0].startswith("call add {")
    assert r.stdout.startswith("call add {")  # an answer that is only a call: no empty line
    r = CliRunner().invoke(main, [*base, "--tool-choice", "required", "--json", "-n", "200"])
    out = json.loads(r.output)
    assert out["finish_reason"] == "tool_calls" and out["tool_calls"][0]["type"] == "function"
    # refused before the model loads, naming the flag
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"function": {"name": "f", "parameters": {"properties": 5}}}]))
    for args, message in [
        (["--tool-choice", "nope"], "--tool-choice"),
        (["--regex", "a"], "one or the other"),
        (["--raw"], "--raw"),
    ]:
        r = CliRunner().invoke(main, [*base, *args])
        assert r.exit_code == 2 and message in r.output, r.output
    r = CliRunner().invoke(main, [*base[:-2], "--tools", str(bad)])
    assert r.exit_code == 2 and "'f' parameters" in r.output, r.output
    r = CliRunner().invoke(main, [*base[:-2], "--tool-choice", "required"])
    assert r.exit_code == 2 and "--tool-choice needs --tools" in r.output
