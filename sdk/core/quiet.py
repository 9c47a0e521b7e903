"""Keeping what native libraries print off the process's stdout and stderr (no torch here: the
runtimes use it too)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def quiet_native(name: str, loggers: Sequence[str] = ()) -> Iterator[None]:
    """Run `name` (a converter, a native runtime) with file descriptors 1 and 2 sent to a
    temporary file, and its Python `loggers` at ERROR: converters and runtimes print progress
    bars and native (C++) logs there, which would garble a build's progress display, `--json`
    output and the answers `infopt-pack run` streams. On an error, the tail of what it printed
    is added to the exception's notes. While it runs, other threads' output to those
    descriptors goes there too; a process without them (a windowed app) runs `name` as it is."""
    _flush()
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:  # no stdout/stderr descriptors: nothing to keep clean
        yield
        return
    levels = {n: logging.getLogger(n).level for n in loggers}
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            for n in loggers:
                logging.getLogger(n).setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except BaseException as e:
            _flush()
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", "replace").strip()
            if tail:
                e.add_note(f"{name} printed:\n{tail}")
            raise
        finally:
            _flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None in windowed apps
            stream.flush()
