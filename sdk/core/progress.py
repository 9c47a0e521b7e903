"""How long steps report progress: a callable the library calls and a front end draws (the
command line's bars on stderr; nothing for `--json` or an app that passes none)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        """`done` of `total` units of `stage` are finished; `detail` says more (a loss)."""
        ...


def silent(stage: str, done: int, total: int, detail: str = "") -> None:
    """Progress reported nowhere."""
