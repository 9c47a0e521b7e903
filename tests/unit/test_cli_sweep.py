"""Every command, given bad files and bad values, answers with a usage error (exit 2) or one
typed line (exit 1): never a traceback of a non-infopt exception. An unexpected exception (a
bug) is one line too, with exit code 70, and its traceback only with INFOPT_DEBUG=1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from infopt.cli import main

LEGACY = Path(__file__).parents[1] / "data" / "legacy" / "tiny-v1"


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "text.txt").write_text("hello\n")
    (root / "empty").mkdir()
    (root / "truncated.gguf").write_bytes(tiny_gguf.read_bytes()[:5000])
    (root / "bad.zip").write_bytes(b"PK\x03\x04junk")
    bundle = shutil.copytree(LEGACY, root / "bundle-without-files")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (root / "plan.json").write_text('{"x": 1}')
    return {
        "missing": root / "missing",
        "text": root / "text.txt",
        "empty dir": root / "empty",
        "truncated gguf": root / "truncated.gguf",
        "broken bundle": bundle,
        "not a zip": root / "bad.zip",
        "root": root,
    }


def per_input(p: str, out: str) -> list[list[str]]:
    return [
        ["inspect", p],
        ["inspect", p, "--json"],
        ["run", p, "--prompt", "hi", "-n", "2"],
        ["verify", p],
        ["unpack", p, "-o", out],
        ["plan", p, "--device", "host"],
        ["build", p, "--device", "host", "-o", out, "--runtime", "pytorch"],
        ["eval", p, "--max-tokens", "16"],
        ["bench", p],
    ]


def bad_values(g: str, root: Path) -> list[list[str]]:
    out = str(root / "out")
    run = ["run", g, "--prompt"]
    plan = ["plan", g, "--device", "host"]
    build = ["build", g, "--device", "host", "-o"]
    return [
        [*run, "hi", "-n", "-1"],
        [*run, "hi", "--temperature", "-1"],
        [*run, "hi", "--top-p", "2"],
        [*run, "hi", "--top-k", "-3"],
        [*run, "hi", "--min-p", "nan"],
        [*run, "hi", "--threads", "0"],
        [*run, "hi", "--max-context", "0"],
        [*run, "hi", "--runtime", "nope"],
        [*run, "hi", "--device", "tpu"],
        [*run, "hi", "--draft", str(root / "text.txt")],
        [*run, "hi", "--num-draft-tokens", "0"],
        [*run, "hi", "--stop", ""],
        [*run, "hi", "--numerics", "precise"],
        [*run, "hi", "--key", str(root / "text.txt")],
        ["plan", g, "--device", "nope"],
        [*plan, "--context", "-1"],
        [*plan, "--quantize", "int3"],
        [*plan, "--batch", "0"],
        [*plan, "--latency-ms", "-1"],
        [*build, out, "--context", "-5"],
        [*build, out, "--batch", "0"],
        ["bench", str(LEGACY), "--repeat", "0"],
        ["bench", str(LEGACY), "--threads", "0"],
        ["bench", str(LEGACY), "--runtime", "bogus"],
        ["build", g, "--plan", str(root / "plan.json"), "-o", out],
        ["build", g, "-o", out],
        [*build, str(root / "text.txt")],
        [*build, "/proc/infopt-test"],  # a directory nothing may be written into
        [*build, out, "--speculative", "bogus"],
        [*build, out, "--calibration", str(root / "empty")],
        [*build, out, "--sign", str(root / "text.txt")],
        ["eval", g, "--quantize", "int3"],
        ["distill", g, "--steps", "0", "-o", str(root / "student")],
        ["keygen", "/proc/infopt-test/key"],
        ["keygen", str(root / "empty")],
    ]


def test_no_command_lets_a_non_infopt_exception_through(
    bad: dict[str, Path], tiny_gguf: Path
) -> None:
    cases = [
        c for k, p in bad.items() if k != "root" for c in per_input(str(p), str(bad["root"] / "o"))
    ]
    cases += bad_values(str(tiny_gguf), bad["root"])
    escaped = []
    for args in cases:
        result = CliRunner().invoke(main, args)
        if not isinstance(result.exception, (SystemExit, type(None))) or result.exit_code not in (
            1,
            2,
        ):
            escaped.append((args, result.exit_code, repr(result.exception)))
        elif "Traceback" in result.stderr:
            escaped.append((args, result.exit_code, result.stderr[-300:]))
    assert not escaped, escaped[:5]
    assert not (bad["root"] / "o").exists() and not (bad["root"] / "out").exists()


def test_a_bug_is_one_line_and_exit_code_70_with_its_traceback_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr("infopt.device_profiles.builtin_names", broken)
    result = CliRunner().invoke(main, ["devices"])
    assert result.exit_code == 70
    assert "internal error, a bug in infopt: TypeError: a bug" in result.stderr
    assert "INFOPT_DEBUG=1" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setenv("INFOPT_DEBUG", "1")
    result = CliRunner().invoke(main, ["devices"])
    assert isinstance(result.exception, TypeError)  # raised: the traceback is printed


def test_a_reader_that_leaves_ends_the_command_quietly() -> None:
    """`infopt-pack devices | head -1`: the pipe closes before the table is written; the
    command stops with 141 (as a Unix tool killed by SIGPIPE) and says nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "infopt.cli", "devices"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes a byte: its first write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_bench_refuses_a_runtime_before_measuring(tmp_path: Path) -> None:
    """`bench --runtime X` says what is wrong with X as `run` does (unknown, or not in the
    bundle), at once, not as a failed measurement of a child process; bad counts are usage
    errors naming the option."""
    bundle = Path(shutil.copytree(LEGACY, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["artifacts"]["openvino"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["bench", str(bundle), "--runtime", "bogus"])
    assert result.exit_code == 1
    assert "unknown runtime 'bogus'" in result.stderr and "measurement" not in result.stderr
    result = CliRunner().invoke(main, ["bench", str(bundle), "--runtime", "openvino"])
    assert result.exit_code == 1
    assert "no 'openvino' artifact in this bundle" in result.stderr
    assert "measurement" not in result.stderr
    for option in ("--repeat", "--threads"):
        result = CliRunner().invoke(main, ["bench", str(bundle), option, "0"])
        assert result.exit_code == 2 and option in result.stderr
    result = CliRunner().invoke(
        main, ["build", str(bundle), "-d", "host", "--context", "-5", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--context" in result.stderr
    assert not (tmp_path / "o").exists()
