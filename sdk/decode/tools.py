"""Tool calling: tools shown to the model through its chat template (or, where the template has
no tool support, in the format the model was trained on), the call constrained to the tools'
parameter schemas once the model starts one, and parsed back into `ToolCall`s.

Three call formats cover the families infopt runs:
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call, as Qwen2.5
  and Qwen3 write them; their templates render the tools themselves.
- "smollm2": one `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` list, the
  format SmolLM2 was tuned on (APIGen's system prompt; its template has no tool support).
- "json": one bare `{"name": ..., "parameters": {...}}` object, as Llama 3.1+ templates ask
  for, and as Google documents Gemma's function calling (its template has no tool support).

The constraint is lazy, as llguidance's tool-calling grammars are: text is free until the
model writes the format's trigger (`<tool_call>`, or `{` first for "json"); from there the call
must be valid JSON naming one of the tools with arguments that satisfy its schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from infopt.decode.constraints import closed_schema
from infopt.errors import InvalidArgumentError

if TYPE_CHECKING:
    from infopt.core.tokenizer import Tokenizer
    from infopt.decode.generate import Response

TOOL_CHOICES = ("auto", "none", "required")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# How the templates of the models these formats come from write JSON (Jinja's tojson, Python's
# json.dumps): the model has seen ", " and ": " and nothing else, so the call is held to them.
SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments as JSON text."""

    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    @property
    def args(self) -> dict[str, Any]:
        """The arguments parsed."""
        value: dict[str, Any] = json.loads(self.arguments)
        return value

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def check_tools(tools: object) -> list[dict[str, Any]]:
    """`tools` in OpenAI's form ([{"type": "function", "function": {"name", "description",
    "parameters"}}]; a bare {"name", ...} is taken too), checked and normalised. Typed errors
    name the tool and the field."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise InvalidArgumentError(
            f"tools={tools!r}: expected a non-empty list of "
            '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
        )
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InvalidArgumentError(f"tools[{i}] = {tool!r}: expected a dict")
        kind = tool.get("type", "function")
        if kind != "function":
            raise InvalidArgumentError(f"tools[{i}] type {kind!r}: only 'function' tools exist")
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, Mapping):
            raise InvalidArgumentError(f"tools[{i}]: no 'function' with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidArgumentError(
                f"tools[{i}] name {name!r}: 1 to 64 letters, digits, '_' or '-'"
            )
        if name in seen:
            raise InvalidArgumentError(f"tools[{i}] name {name!r}: two tools have this name")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise InvalidArgumentError(
                f"tools[{i}] ({name}) parameters: expected a JSON schema of type 'object', "
                f"got {params!r}"
            )
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidArgumentError(f"tools[{i}] ({name}) description: expected a string")
        entry = {"name": name, "parameters": dict(params)}
        if description:
            entry["description"] = description
        out.append({"type": "function", "function": entry})
    return out


def check_tool_choice(choice: object, tools: Sequence[dict[str, Any]]) -> str:
    """ "auto" (the default), "none", "required", or the name of the one tool to call (from
    {"type": "function", "function": {"name": ...}}, OpenAI's form)."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice in TOOL_CHOICES:
            return choice
        raise InvalidArgumentError(
            f"tool_choice={choice!r}: expected one of {list(TOOL_CHOICES)} or "
            '{"type": "function", "function": {"name": ...}}'
        )
    fn = choice.get("function") if isinstance(choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"tool_choice={choice!r}: expected one of {list(TOOL_CHOICES)} or "
            '{"type": "function", "function": {"name": ...}}'
        )
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise InvalidArgumentError(f"tool_choice names {name!r}, which is not in tools {names}")
    return name


class ToolFormat:
    """How one family of models writes tool calls, and how its prompt shows tools where the
    chat template does not."""

    name = ""
    trigger = "<tool_call>"  # the text that opens a call
    end = "</tool_call>"  # the text that closes it ("" : the call runs to the answer's end)
    arguments_key = "arguments"
    repeats = True  # calls come one block each (else: one block holds them all)
    # an answer that opens with "{" is one call without markers: some models tuned on the
    # format write it so (Qwen2.5-Coder), as llama.cpp's Hermes parser also allows
    bare = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def item_schema(self, tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The JSON schema of one call: any of the tools, by name, with its arguments."""
        calls = []
        for tool in tools:
            fn = tool["function"]
            calls.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": fn["name"]},
                        self.arguments_key: closed_schema(fn["parameters"]),
                    },
                    "required": ["name", self.arguments_key],
                    "additionalProperties": False,
                }
            )
        return {"anyOf": calls, "x-guidance": SEPARATORS}

    def grammar(
        self,
        tools: Sequence[dict[str, Any]],
        required: bool,
        tokens: Mapping[str, int] | None = None,
        parallel: bool = False,
    ) -> str:
        """The Lark grammar (llguidance's dialect) of an answer: text, or text and a call
        (`required`: a call and nothing else; `parallel`: one or more calls). `tokens`: the
        format's markers that are tokens of their own in the vocabulary (Qwen's `<tool_call>`),
        by id: llguidance takes them as special tokens, which no text can spell."""
        marks = dict(tokens or {})

        def lit(text: str) -> str:
            return f"<[{marks[text]}]>" if text in marks else json.dumps(text)

        item = f"item: %json {json.dumps(self.item_schema(tools))}"
        trigger, body = lit(self.trigger), self.body(lit, parallel)
        many = parallel and self.repeats
        if required:
            more = ' ("\\n"? call)*' if many else ""
            return f"start: call{more}\ncall: {trigger} {body}\n{item}\n"
        # a bare call: an answer that opens with "{" is a call without its markers (text then
        # may not open with "{")
        bare = "item | " if self.bare else ""
        text = "/([^{](.|\\n)*)?/" if self.bare else "/(.|\\n)*/"
        if self.trigger in marks:  # text cannot write the token: it simply ends the text
            calls = "(call TEXT)*" if many else "call?"
            # nor may text spell the marker out in pieces: the splitter would take what
            # follows for a call that no grammar held to the tools
            spelled = f"~/(?s:.*){re.escape(self.trigger)}(?s:.*)/"
            return (
                f"start: {bare}TEXT {calls}\nTEXT: {text} & {spelled}\n"
                f"call: {trigger} {body}\n{item}\n"
            )
        # llguidance's lazy head: any text, up to the first trigger; then the call's body
        start = "call* TEXT" if many else "call | TEXT"
        return (
            f"start: {bare}{start}\nTEXT: {text}\nhead[lazy]: TEXT {trigger}\n"
            f"call: head {body}\n{item}\n"
        )

    def body(self, lit: Callable[[str], str], parallel: bool) -> str:
        """What follows the trigger in a call, as grammar rules (`lit` writes a marker)."""
        return f'"\\n" item "\\n" {lit(self.end)}'

    def parse(self, body: str) -> list[tuple[str, dict[str, Any]]]:
        """The calls in the text between a trigger and its end: [(name, arguments)]."""
        value = json.loads(body)
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"not a call: {item!r}")
            args = item.get(self.arguments_key, {})
            if not isinstance(args, dict):
                raise ValueError(f"arguments not an object: {args!r}")
            out.append((item["name"], args))
        return out

    def prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """The system text that shows the tools, for a template without tool support."""
        raise NotImplementedError

    def call_text(self, calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
        """An assistant turn's calls as the model writes them (for the history)."""
        key = self.arguments_key
        return "\n".join(
            f"{self.trigger}\n{json.dumps({'name': n, key: a}, ensure_ascii=False)}\n{self.end}"
            for n, a in calls
        )

    def result_message(self, content: str) -> dict[str, Any]:
        """A tool's result as the turn the model was tuned to read it in."""
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}


class Hermes(ToolFormat):
    name = "hermes"
    bare = True

    def prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\nFor each function call, return a json object with "
            "function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>"
        )


class SmolLM2(ToolFormat):
    name = "smollm2"
    repeats = False

    def body(self, lit: Callable[[str], str], parallel: bool) -> str:
        more = ' ("," "\\n"? item)*' if parallel else ""
        return f'"[" "\\n"? item{more} "\\n"? "]" {lit(self.end)}'

    def prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        return (
            "You are an expert in composing functions. You are given a question and a set of "
            "possible functions.\nBased on the question, you will need to make one or more "
            "function/tool calls to achieve the purpose.\nIf none of the functions can be used, "
            "point it out and refuse to answer.\nIf the given question lacks the parameters "
            "required by the function, also point it out.\n\nYou have access to the following "
            f"tools:\n<tools>{listed}</tools>\n\nThe output MUST strictly adhere to the "
            "following format, and NO other text MUST be included.\nThe example format is as "
            "follows. Please make sure the parameter type is correct. If no function call is "
            "needed, please make the tool calls an empty list '[]'.\n<tool_call>[\n"
            '{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": '
            '"value2"}},\n... (more tool calls as required)\n]</tool_call>'
        )

    def call_text(self, calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
        items = ",\n".join(
            json.dumps({"name": n, "arguments": a}, ensure_ascii=False) for n, a in calls
        )
        return f"<tool_call>[\n{items}\n]</tool_call>"


class JsonCall(ToolFormat):
    name = "json"
    trigger = "{"
    end = ""
    arguments_key = "parameters"
    bare = True

    def grammar(
        self,
        tools: Sequence[dict[str, Any]],
        required: bool,
        tokens: Mapping[str, int] | None = None,
        parallel: bool = False,
    ) -> str:
        item = f"item: %json {json.dumps(self.item_schema(tools))}"
        if required:
            return f"start: item\n{item}\n"
        # an answer that does not open with "{" is text; one that does is the call
        return f"start: TEXT | item\nTEXT: /([^{{](.|\\n)*)?/\n{item}\n"

    def prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        return (
            "You have access to functions. If you decide to invoke any of the function(s), you "
            'MUST put it in the format of {"name": function name, "parameters": dictionary of '
            "argument name and its value}\n\nYou SHOULD NOT include any other text in the "
            f"response if you call a function\n{listed}"
        )

    def call_text(self, calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
        return "\n".join(
            json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls
        )

    def result_message(self, content: str) -> dict[str, Any]:
        return {"role": "user", "content": f"Function result:\n{content}"}


@dataclass(frozen=True)
class ToolSupport:
    """A model's tool calling: its call format, and whether its chat template renders the tools
    and the tool turns itself (else infopt writes them in the format's own words)."""

    format: ToolFormat
    native: bool


def tool_support(tokenizer: Tokenizer, architecture: str) -> ToolSupport:
    """The format a model calls tools in, read off its chat template (and architecture)."""
    from infopt.core.tokenizer import template_variables

    template = tokenizer.chat_template or ""
    native = "tools" in template_variables(template) if template else False
    if "<tool_call>" in template:
        return ToolSupport(Hermes(), native)
    if native and ('"parameters"' in template or "<|python_tag|>" in template):
        return ToolSupport(JsonCall(), native)
    if "SmolLM" in template:
        return ToolSupport(SmolLM2(), False)
    if architecture.startswith("gemma") or "<start_of_turn>" in template:
        return ToolSupport(JsonCall(), native)
    return ToolSupport(Hermes(), native)


def tool_grammar(
    fmt: ToolFormat,
    tools: Sequence[dict[str, Any]],
    required: bool,
    tokens: Mapping[str, int] | None = None,
    parallel: bool = False,
) -> str:
    """The llguidance grammar of an answer that may (`required`: must) call `tools` (once, or
    `parallel`: one or more times), checked: a tool whose parameter schema llguidance cannot
    compile is a typed error naming it. `tokens`: as `ToolFormat.grammar`'s
    (`marker_tokens`)."""
    from infopt.decode.constraints import llguidance_module

    check_tool_schemas(tools)
    lark = fmt.grammar(tools, required, tokens, parallel)
    return str(llguidance_module().LLMatcher.grammar_from_lark(lark))


def check_tool_schemas(tools: Sequence[dict[str, Any]]) -> None:
    """Each tool's parameter schema compiled by llguidance (`check_tools`' output), one at a
    time so that an error names the tool: before any work, whatever the model's format."""
    from infopt.decode.constraints import error_reason, llguidance_module

    matcher = llguidance_module().LLMatcher
    for tool in tools:
        schema = {**closed_schema(tool["function"]["parameters"]), "x-guidance": SEPARATORS}
        try:
            message = matcher.validate_grammar(matcher.grammar_from_json_schema(schema))
        except Exception as e:
            message = str(e)
        if message:
            name = tool["function"]["name"]
            raise InvalidArgumentError(f"tools: {name!r} parameters: {error_reason(message)}")


def marker_tokens(fmt: ToolFormat, tokenizer: Tokenizer, view: Any) -> dict[str, int]:
    """The format's markers that the vocabulary holds as one token llguidance takes as special
    (an added token: Qwen's `<tool_call>`), by text."""
    out = {}
    for text in (fmt.trigger, fmt.end):
        token = tokenizer.backend.token_to_id(text) if text else None
        if token is not None and view.is_special_token(token):
            out[text] = int(token)
    return out


def _arguments(call: object, where: str) -> tuple[str, dict[str, Any]]:
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping):
        raise InvalidArgumentError(
            f"{where} = {call!r}: expected {{'function': {{'name': str, 'arguments': JSON}}}}"
        )
    name, args = fn.get("name"), fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{where} arguments: not JSON ({e})") from None
    if not isinstance(name, str) or not isinstance(args, dict):
        raise InvalidArgumentError(
            f"{where}: expected {{'function': {{'name': str, 'arguments': JSON object}}}}"
        )
    return name, args


def tool_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    support: ToolSupport,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Chat messages with tool turns (assistant `tool_calls`, `tool` results) as the template
    takes them, and the template's extra variables (`tools`, for one that renders them). For
    a template without tool support, the tools go in the system message in the format's words
    and tool turns become the text the model was tuned on."""
    out: list[dict[str, Any]] = []
    fmt = support.format
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            out.append(m)  # check_messages names it
            continue
        msg = dict(m)
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
                raise InvalidArgumentError(
                    f"messages[{i}]['tool_calls'] = {calls!r}: expected a list of calls"
                )
            parsed = [
                _arguments(c, f"messages[{i}]['tool_calls'][{j}]") for j, c in enumerate(calls)
            ]
            if msg.get("content") is None:
                msg["content"] = ""
            if support.native:  # templates take arguments as a mapping (tojson'd)
                msg["tool_calls"] = [
                    {"type": "function", "function": {"name": n, "arguments": a}} for n, a in parsed
                ]
            else:
                text = fmt.call_text(parsed)
                msg = {"role": "assistant", "content": f"{msg['content']}{text}".strip()}
        elif msg.get("role") == "tool" and not support.native:
            content = msg.get("content")
            if not isinstance(content, str):  # JSON results are sent as text, as OpenAI's are
                raise InvalidArgumentError(
                    f"messages[{i}]['content'] = {content!r}: a tool result must be a string "
                    "(json.dumps a structured result)"
                )
            msg = fmt.result_message(content)
        out.append(msg)
    if not tools:
        return out, {}
    if support.native:
        return out, {"tools": list(tools)}
    prompt = fmt.prompt(tools)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{prompt}\n\n{out[0].get('content') or ''}".rstrip()}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


class CallSplitter:
    """Takes a format's calls out of streamed text: `push(delta)` returns the text outside
    calls that is safe to show now and the calls completed in it."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.pending = ""  # text held back: a trigger arriving in pieces, or a call unfinished
        self.in_call = False
        self.started = False  # whether the answer's first character came
        self.whole = False  # the answer is one bare call

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        fmt, out, calls = self.fmt, "", []
        self.pending += delta
        while self.pending:
            if not self.in_call:
                if fmt.bare and not self.started:  # a bare call is the whole answer
                    # as the grammar has it: "{" first, no space before it (text that opens
                    # otherwise is text, unconstrained, and never taken for a call)
                    self.started = True
                    if self.pending.startswith("{"):
                        self.in_call, self.whole = True, True
                        continue
                if not fmt.end:  # "json": the answer was not a call: text
                    out, self.pending = out + self.pending, ""
                    break
                at = self.pending.find(fmt.trigger)
                if at < 0:
                    keep = _partial(self.pending, fmt.trigger)
                    cut = len(self.pending) - keep
                    out, self.pending = out + self.pending[:cut], self.pending[cut:]
                    break
                out, self.pending, self.in_call = out + self.pending[:at], self.pending[at:], True
            if self.whole:
                break  # it runs to the answer's end
            # the call ends at the first end marker after a complete body: an argument's text
            # may hold the marker itself
            body, end, found = len(fmt.trigger), -1, None
            while found is None:
                end = self.pending.find(fmt.end, end + 1 if end >= 0 else body)
                if end < 0:
                    break
                found = self._parse(self.pending[body:end])
            if found is None:
                break  # not closed yet (at the answer's end, what is left stays text)
            calls += found
            self.pending, self.in_call = self.pending[end + len(fmt.end) :], False
        return out, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the answer's end: a bare call, complete now, or what is left as text (a call cut
        short by max_new_tokens stays text: nothing is lost)."""
        rest, self.pending = self.pending, ""
        if self.whole:
            found = self._parse(rest)
            if found is not None:
                return "", found
        return rest, []

    def _parse(self, body: str) -> list[ToolCall] | None:
        try:
            found = self.fmt.parse(body.strip())
        except (ValueError, TypeError):
            return None
        return [ToolCall(n, json.dumps(a, ensure_ascii=False)) for n, a in found]


def split_calls(responses: Iterator[Response], fmt: ToolFormat) -> Iterator[Response]:
    """Responses with the calls taken out of their text into `tool_calls` (the calls completed
    at that response). An answer that made calls and ended by itself ends with finish_reason
    "tool_calls", as OpenAI's do."""
    splitter, made = CallSplitter(fmt), 0
    for r in responses:
        text, calls = splitter.push(r.text)
        finish = r.finish_reason
        if finish is not None:
            rest, more = splitter.finish()
            text, calls = text + rest, calls + more
            if made + len(calls) and finish == "stop":
                finish = "tool_calls"
        made += len(calls)
        yield replace(r, text=text, tool_calls=calls, finish_reason=finish)


def _partial(text: str, word: str) -> int:
    """Length of the longest suffix of `text` that begins `word` (held back: it may be a
    trigger arriving in pieces)."""
    for k in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:k]):
            return k
    return 0
