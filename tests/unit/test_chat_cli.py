"""`infopt-pack chat` on the tiny GGUF, scripted through stdin: what each turn sends the model
(checked against the prompt the messages should make), the commands, and refused input."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import infopt
from infopt.cli import main

RUNTIME = "pytorch"  # no conversion: the chat's logic is what is under test
ARGS = ("--runtime", RUNTIME, "--context", "128", "-n", "6")


def chat(model: Path, lines: list[str], *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, ["chat", str(model), *ARGS, *extra], input="".join(f"{x}\n" for x in lines)
    )
    return result.exit_code, result.stdout, result.stderr


def prompt_tokens(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"^\[(\d+) prompt tokens", stderr, re.MULTILINE)]


@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> Any:
    return infopt.load(tiny_gguf, runtime=RUNTIME, max_context=128)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def answer(model: Any, messages: list[dict[str, str]]) -> str:
    return str(model.generate(messages, max_new_tokens=6).text)


def test_two_turns_send_the_whole_conversation(tiny_gguf: Path, model: Any) -> None:
    code, out, err = chat(tiny_gguf, ["hello there", "and the fox?"])
    assert code == 0, err
    first = answer(model, [user("hello there")])
    history = [user("hello there"), {"role": "assistant", "content": first}, user("and the fox?")]
    second = answer(model, history)
    assert out == f"{first}\n{second}\n"
    sent = [len(model.encode_prompt([user("hello there")])), len(model.encode_prompt(history))]
    assert prompt_tokens(err) == sent
    assert "TTFT" in err and "tok/s" in err
    # the second turn starts with the first's prompt: the prefix cache has it, the footer says so
    cached = [int(n or 0) for n in re.findall(r"prompt tokens(?: \((\d+) cached\))?", err)]
    assert cached[0] == 0 and 0 < cached[1] < sent[1]


def test_reset_and_system(tiny_gguf: Path, model: Any) -> None:
    lines = ["hello there", "/reset", "hello there", "/system Be brief.", "/system", "dog"]
    code, out, err = chat(tiny_gguf, lines)
    assert code == 0, err
    first = answer(model, [user("hello there")])
    system = [{"role": "system", "content": "Be brief."}]
    history = [*system, user("hello there"), {"role": "assistant", "content": first}, user("dog")]
    assert out == f"{first}\n{first}\n{answer(model, history)}\n"
    alone = len(model.encode_prompt([user("hello there")]))
    assert prompt_tokens(err) == [alone, alone, len(model.encode_prompt(history))]
    assert "(conversation cleared)" in err and "system message: Be brief." in err


def test_system_option_and_no_stats(tiny_gguf: Path, model: Any) -> None:
    code, out, err = chat(tiny_gguf, ["//hi"], "--system", "You are terse.", "--no-stats")
    assert code == 0, err
    messages = [{"role": "system", "content": "You are terse."}, user("/hi")]  # // escapes /
    assert out == answer(model, messages) + "\n" and "prompt tokens" not in err


def test_bad_input_is_refused_and_the_chat_goes_on(tiny_gguf: Path, model: Any) -> None:
    too_long = "The quick brown fox jumps over the lazy dog. " * 30
    lines = ["", "/bogus", too_long, "   ", "/", "hello there", "/exit", "x"]
    code, out, err = chat(tiny_gguf, lines)
    assert code == 1  # a script learns that lines were refused
    assert "unknown command '/bogus'" in err and "unknown command '/'" in err
    assert "ContextLengthError" in err
    assert out == answer(model, [user("hello there")]) + "\n"  # nothing after /exit
    assert "Traceback" not in err


def test_oldest_turns_are_dropped_to_fit_the_context(tiny_gguf: Path) -> None:
    lines = [f"message number {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]
    code, _, err = chat(tiny_gguf, lines)
    assert code == 0, err
    assert "oldest messages were dropped" in err and len(prompt_tokens(err)) == 6
    assert max(prompt_tokens(err)) + 6 <= 128


def test_an_answer_gets_the_room_the_context_leaves(tiny_gguf: Path, model: Any) -> None:
    """`-n` longer than the context leaves: the answer gets the room beside the conversation
    (every turn was refused), and the conversation keeps its turns while that room is at least
    a quarter of the context, then drops the oldest. A context no chat fits in is refused at
    start, as a usage error naming --context."""
    from infopt.cli.chat import Conversation, _start

    def answered(turns: list[dict[str, str]]) -> tuple[int, Any]:
        conv = Conversation(turns=list(turns))
        stream, _, dropped = _start(model, conv, {"max_new_tokens": 500, "seed": None})
        for _ in stream:
            pass
        return dropped, stream.result

    asked = [user("hello there"), {"role": "assistant", "content": "the fox"}, user("and then?")]
    sent = len(model.encode_prompt(asked))
    assert 128 - sent >= 128 // 4  # room enough: the history stays
    dropped, result = answered(asked)
    assert dropped == 0 and result.stats.prompt_tokens == sent
    assert 0 < result.stats.generated_tokens <= 128 - sent
    long = {"role": "assistant", "content": "the quick brown fox jumps " * 12}
    last = len(model.encode_prompt([user("and then?")]))
    assert len(model.encode_prompt([asked[0], long, asked[2]])) > 128 - 128 // 4
    dropped, result = answered([asked[0], long, asked[2]])
    assert dropped == 2 and result.stats.prompt_tokens == last
    code, _, err = chat(tiny_gguf, ["hello there, the quick brown fox"], "-n", "500")
    assert code == 0 and "error" not in err, err
    framing = len(model.tokenizer.encode_chat([{"role": "user", "content": ""}]))
    result = CliRunner().invoke(
        main, ["chat", str(tiny_gguf), "--runtime", RUNTIME, "--context", str(framing + 1)]
    )
    assert result.exit_code == 2 and "--context" in result.stderr, result.output
    assert f"framing of a message takes {framing} tokens" in result.stderr


def test_a_model_without_chat_template_is_refused(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = chat(folder, ["hi"])
    assert code == 1 and "no chat template" in err and "run --raw" in err


def read_until(fd: int, marker: bytes, seen: bytes = b"") -> bytes:
    """What the terminal shows until `marker` (b"": until it closes), within a minute."""
    deadline = time.monotonic() + 60
    while (not marker or marker not in seen) and time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closed: the chat has ended
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_a_terminal_gets_a_prompt_and_keeps_history(tmp_path: Path, tiny_gguf: Path) -> None:
    pty = pytest.importorskip("pty")
    leader, follower = pty.openpty()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "TERM": "dumb"}
    cmd = [sys.executable, "-m", "infopt.cli", "chat", str(tiny_gguf), *ARGS]
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    try:
        os.write(leader, b"hello there\n/bogus\n")
        screen = read_until(leader, b"unknown command")
        assert b"prompt tokens" in screen and b"unknown command" in screen, screen
        screen = read_until(leader, b">>> ", screen[screen.index(b"unknown command") :])
        os.write(leader, b"\x04")  # Ctrl-D at an empty prompt
        screen += read_until(leader, b"")
        assert proc.wait(timeout=10) == 0, screen  # refusals in a terminal are not fatal
    finally:
        proc.kill()
        os.close(leader)
    history = (tmp_path / "infopt" / "chat_history").read_text()
    assert "hello there" in history and "/bogus" in history
