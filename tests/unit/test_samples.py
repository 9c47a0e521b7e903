"""The samples run: the desktop chat answers two turns on stdin (echoed), then quits; the mobile
TFLite loop, written without infopt, gives infopt's own tokens from the bundle's manifest alone."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import infopt

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("draft", [[], ["--draft", "ngram"]])
def test_desktop_chat_runs_two_turns(tiny_gguf: Path, draft: list[str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "samples/desktop/chat.py"),
            str(tiny_gguf),
            "--max-new-tokens",
            "4",
            "--system",
            "Be brief.",
            *draft,
        ],
        # a message too long for the context is refused and the chat goes on; /exit quits
        input=f"hello\n{'word ' * 5000}\nand again\n/exit\nnot sent\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "error: prompt (" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # piped input is echoed after its prompt, so each turn reads on its own lines
    assert "you> hello\nassistant> " in proc.stdout
    assert "you> and again\nassistant> " in proc.stdout


def test_the_mobile_sample_needs_only_the_manifest(tiny_tflite_bundle: Path) -> None:
    # samples/mobile/tflite_app.py drives the .tflite as an Android app would (no infopt): the
    # manifest's signatures, windows and cache shape are enough for infopt's own greedy tokens
    path = ROOT / "samples" / "mobile" / "tflite_app.py"
    spec = importlib.util.spec_from_file_location("tflite_app", path)
    assert spec is not None and spec.loader is not None
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    app = sample.TFLiteModel(tiny_tflite_bundle)
    app.eos = set()  # random weights: run the full length, as infopt does below
    prompt = "hello there " * 12  # longer than a verify window: prefill, then decode steps
    expected = infopt.load(tiny_tflite_bundle).generate(
        prompt, max_new_tokens=20, stop_token_ids=[]
    )
    assert app.generate(prompt, 20) == expected.token_ids
    with pytest.raises(ValueError, match=r"compiled context of 96"):
        app.generate("hello " * 100, 20)
