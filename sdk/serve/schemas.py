"""The OpenAI wire format: request bodies as pydantic models, errors, and the response objects
and stream chunks built from a generation, shaped as OpenAI's own clients parse them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from infopt.api import Prompt
from infopt.decode.tools import ToolCall


class ApiError(Exception):
    """An OpenAI-style error response: HTTP status and the `error` object's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Unknown fields (name, ...) are ignored, as the model's template has no use for them;
    # content None is an assistant turn that only called tools.
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # pydantic would try every member of the union and report the string one ("Input
        # should be a valid string"); an image or audio part deserves its own answer
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(
                    f"a content part of type {kind!r}: this model reads text only "
                    "(parts of type 'text')"
                )
        return content

    def as_dict(self) -> dict[str, Any]:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's newer name for the system role; chat templates know only "system"
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class BaseRequest(BaseModel):
    """Fields both endpoints share. Others OpenAI defines (logprobs, penalties, user, ...) are
    accepted and ignored, as OpenAI-compatible servers commonly do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's; vLLM and llama.cpp take it
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured output: OpenAI's response_format; `regex` and `grammar` (Lark or GBNF) as
    # vLLM's and llama.cpp's servers take them
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None

    def prompt(self) -> Prompt:
        raise NotImplementedError

    def token_limit(self) -> int | None:
        return self.max_tokens

    def settings(self) -> dict[str, Any]:
        """`Model.stream` keywords, all but max_new_tokens (which needs the prompt's length)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,  # OpenAI-style clients send 0 for "off"
            "stop": stop,
            "seed": self.seed,
            "response_format": self.response_format,
            "regex": self.regex,
            "grammar": self.grammar,
        }


class ChatRequest(BaseRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # tool calling, as OpenAI's; one call per answer unless parallel_tool_calls (as
    # llama.cpp's server: small models asked for calls otherwise tend to keep making them)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = False
    functions: list[Any] | None = None  # OpenAI's deprecated form: refused, naming the new one

    def prompt(self) -> Prompt:
        if self.functions is not None:
            raise ApiError(
                400,
                "functions: OpenAI's deprecated form is not taken; send tools=[{'type': "
                "'function', 'function': {'name': ..., 'parameters': {...}}}]",
                param="functions",
            )
        return [m.as_dict() for m in self.messages]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }

    def token_limit(self) -> int | None:
        # OpenAI's newer name wins where a client sends both
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(BaseRequest):
    prompt_: str | list[str] = Field(alias="prompt")
    tools: Any = None  # chat's: refused here by name rather than ignored

    def prompt(self) -> Prompt:
        if self.tools is not None:
            raise ApiError(
                400,
                "tools: a text completion cannot call tools; use /v1/chat/completions",
                param="tools",
            )
        if isinstance(self.prompt_, str):
            return self.prompt_
        if len(self.prompt_) != 1:
            raise ApiError(
                400,
                f"prompt: a list of {len(self.prompt_)} prompts; this server completes one "
                "prompt per request",
                param="prompt",
            )
        return self.prompt_[0]


def parse(cls: type[BaseRequest], body: bytes) -> BaseRequest:
    """The request body as `cls`, or the 400 error OpenAI gives for bad JSON or a bad field."""
    try:
        request = cls.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    if request.n != 1:
        raise ApiError(400, f"n={request.n}: this server returns one choice per request", param="n")
    return request


def validation_error(errors: Any) -> ApiError:
    """The first of pydantic's (or FastAPI's) errors, as OpenAI words a bad request."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Shapes:
    """One response's objects: its id, creation time and model name stay the same across the
    chunks of a stream, as OpenAI's do."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat, self.model_id = chat, model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    def completion(
        self,
        text: str,
        finish_reason: str,
        counts: dict[str, int],
        tool_calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:  # as OpenAI's: no text is content null
                message.update(content=text or None, tool_calls=[c.to_dict() for c in tool_calls])
            choice: dict[str, Any] = {"message": message}
        else:
            choice = {"text": text}
        choice.update(index=0, logprobs=None, finish_reason=finish_reason)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._object(kind, [choice]), "usage": counts}

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        first: bool = False,
        with_usage: bool = False,
        tool_calls: Sequence[ToolCall] = (),
        call_index: int = 0,
    ) -> str:
        """One server-sent event. In a chat stream the first chunk carries the role and the
        last an empty delta with the finish reason; with usage asked for, every chunk has
        `usage: null` until the closing one (see `usage_chunk`). A call comes whole in one
        delta (its index among the answer's calls from `call_index`), as soon as the model
        has closed it."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [
                    {"index": call_index + i, **c.to_dict()} for i, c in enumerate(tool_calls)
                ]
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        data = self._object(kind, [choice])
        if with_usage:
            data["usage"] = None
        return event(data)

    def usage_chunk(self, counts: dict[str, int]) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return event({**self._object(kind, []), "usage": counts})


def event(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"
