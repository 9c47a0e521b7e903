"""infopt.core.quiet: what native libraries print stays off stdout/stderr, is kept for errors, and a
process without those descriptors still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infopt.core.quiet import quiet_native


def test_native_output_is_kept_off_and_given_to_errors(capfd: pytest.CaptureFixture[str]) -> None:
    with quiet_native("lib"):
        os.write(1, b"progress bar\n")  # as C++ code writes, below Python's sys.stdout
        os.write(2, b"INFO: delegate created\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""

    def failing() -> None:
        with quiet_native("lib"):
            os.write(2, b"the reason it failed\n")
            raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError) as info:
        failing()
    assert "lib printed:\nthe reason it failed" in info.value.__notes__[0]


def test_a_process_without_stdout_and_stderr_still_runs(tmp_path: Path) -> None:
    done = tmp_path / "done"
    script = (
        "import os, sys\n"
        "os.close(1); os.close(2); sys.stdout = sys.stderr = None\n"
        "from infopt.core.quiet import quiet_native\n"
        "with quiet_native('lib'):\n"
        f"    open({str(done)!r}, 'w').write('ran')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert done.read_text() == "ran"


def test_the_loggers_named_are_quiet_inside_and_restored_after() -> None:
    import logging

    log = logging.getLogger("a_converter")
    log.setLevel(logging.INFO)
    with quiet_native("converter", ("a_converter",)):
        assert log.level == logging.ERROR
    assert log.level == logging.INFO
