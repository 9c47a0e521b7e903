"""What `load_test` and `soak` share: a server of their own (`infopt-pack serve` as a
subprocess, on a free port) or one given by URL, and a streaming chat request timed chunk by
chunk through the real HTTP API (server-sent events, as OpenAI's clients read them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

START_TIMEOUT_S = 600.0  # a model file's first conversion for a runtime can take minutes
STOP_TIMEOUT_S = 30.0
# Asked of every request: long answers, so that decoding dominates; each request's text is
# made unique by its number, so that no request finds another's prompt in the prefix cache.
PROMPTS = (
    "Write a detailed, step-by-step guide to baking sourdough bread at home.",
    "Explain how a CPU executes an instruction, from fetch to write-back, in detail.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle in depth, with examples from three different climates.",
    "List and explain twenty tips for writing clear technical documentation.",
    "Explain the history of the printing press and its effects on European society.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
    "Describe how to plan a two-week hiking trip, covering gear, food and safety.",
)


@dataclass
class Sample:
    """One request as its client saw it."""

    ok: bool = False  # complete: status 200, a finish reason and the closing [DONE]
    error: str | None = None
    disconnected: bool = False  # the client left on purpose
    ttft_s: float | None = None  # request sent -> first content chunk
    total_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between successive content chunks
    chunks: int = 0
    prompt_tokens: int | None = None  # from the closing usage chunk
    completion_tokens: int | None = None
    finish_reason: str | None = None


def chat_body(i: int, max_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    prompt = PROMPTS[i % len(PROMPTS)]
    return {
        "messages": [{"role": "user", "content": f"({i}) {prompt}"}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    leave_after: int | None = None,
) -> Sample:
    """POST a streaming chat completion and time its chunks. With `leave_after`, the client
    closes the connection after that many content chunks, as a user closing a tab does."""
    sample = Sample()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {_message(await response.aread())}"
                return sample
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    sample.error = f"in stream: {_message(data.encode())}"
                    return sample
                if chunk.get("usage"):
                    sample.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or ():
                    sample.finish_reason = choice.get("finish_reason") or sample.finish_reason
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if sample.ttft_s is None:
                            sample.ttft_s = now - start
                        else:
                            sample.gaps_s.append(now - last)
                        last, sample.chunks = now, sample.chunks + 1
                        if leave_after is not None and sample.chunks >= leave_after:
                            sample.disconnected = True
                            return sample  # leaving the block closes the connection
            if not done:
                sample.error = "the stream ended without [DONE]"
            elif sample.finish_reason is None:
                sample.error = "no finish_reason in the stream"
            else:
                sample.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    finally:
        sample.total_s = time.perf_counter() - start
    return sample


def _message(raw: bytes) -> str:
    """An error response's message (OpenAI's {"error": {"message"}}), else its first bytes."""
    try:
        return str(json.loads(raw)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    """{"p50": ..., ...} in milliseconds; None where there is nothing to measure."""
    if not values:
        return {f"p{q}": None for q in qs}
    points = np.percentile(np.asarray(values, dtype=np.float64) * 1000, qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, points, strict=True)}


def host() -> dict[str, Any]:
    """The machine the figures come from (the client's; the server's too when it started it)."""
    from infopt.device_profiles.host import cpu_info

    name, flags, hz = cpu_info()
    return {
        "cpu": name,
        "cpu_flags": list(flags),
        "cpu_mhz": round(hz / 1e6),
        "cores": os.cpu_count(),
    }


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def health(url: str, timeout: float = 10.0) -> dict[str, Any]:
    response = httpx.get(f"{url}/health", timeout=timeout)
    response.raise_for_status()
    return dict(response.json())


class Server:
    """`infopt-pack serve` on a free loopback port, for as long as the `with` block runs; its
    output goes to a log file, quoted when it fails to start."""

    def __init__(
        self, model: str | None, serve_args: Sequence[str], api_key: str | None = None
    ) -> None:
        self.cmd = [sys.executable, "-m", "infopt.cli", "serve", *([model] if model else [])]
        self.cmd += ["--host", "127.0.0.1", "--port", "0", *serve_args]
        # the key goes by serve's environment variable, not on a command line others can read
        self.env = {**os.environ, **({"INFOPT_API_KEY": api_key} if api_key else {})}
        fd, log = tempfile.mkstemp(prefix="infopt-serve-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.runtime: str | None = None  # as the server's first line names it

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def __enter__(self) -> Server:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while not self.url:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the server exited ({self.proc.returncode}):\n{self.tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start in {START_TIMEOUT_S:.0f} s")
                self._read_banner()
                time.sleep(0.1)
            health(self.url, timeout=START_TIMEOUT_S)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Ctrl-C, as a user stops it (running requests get the server's grace period), then
        SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)

    def _read_banner(self) -> None:
        """The URL (and the runtime) from serve's first line: "Serving NAME (RUNTIME, N slots)
        at URL/ ..."."""
        text = self.log.read_text(errors="replace")
        url = re.search(r" at (http://[^\s/]+)/?\s", text) or re.search(r"(http://[^\s/]+)", text)
        self.url = url.group(1) if url else ""
        runtime = re.search(r"\((\S+), \d+ slots?\)", text)
        self.runtime = runtime.group(1) if runtime else None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def server_args(args: Any, queue: int) -> list[str]:
    """`serve`'s options from the tools' common ones (see `add_server_options`)."""
    out = ["--slots", str(args.slots), "--max-queue", str(queue)]
    for flag, value in (("--runtime", args.runtime), ("--threads", args.threads)):
        if value is not None:
            out += [flag, str(value)]
    if args.context is not None:
        out += ["--context", str(args.context)]
    return out


def add_server_options(parser: Any) -> None:
    where = parser.add_argument_group(
        "server", "a running server (--url), or one started here for the run (the default)"
    )
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:8080")
    where.add_argument(
        "--api-key",
        default=os.environ.get("INFOPT_API_KEY"),
        help="The server's API key (default: $INFOPT_API_KEY, which serve reads too).",
    )
    where.add_argument("--model", help="Model to serve (default: the default model).")
    where.add_argument("--runtime", help="Runtime to serve it on (default: serve's choice).")
    where.add_argument("--slots", type=int, default=4, help="serve --slots (default 4).")
    where.add_argument("--threads", type=int, help="serve --threads.")
    where.add_argument("--context", type=int, help="serve --context.")
