"""The samples run: the desktop chat answers two turns on stdin, then quits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
        input="hello\nand again\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
