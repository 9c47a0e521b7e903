"""Kill `infopt-pack build` with SIGKILL at random moments: OUT is never a partial bundle."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from infopt.bundle import verify_bundle
from infopt.errors import BundleError

KILLS = 6


def start_build(model: Path, out: Path) -> subprocess.Popen[bytes]:
    code = "import sys, infopt; infopt.build(sys.argv[1], sys.argv[2], device='host')"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(model), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_killed_builds_never_leave_a_partial_bundle(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "bundle"
    began = time.perf_counter()
    assert start_build(tiny_gguf, out).wait(timeout=300) == 0
    duration = time.perf_counter() - began
    reference = verify_bundle(out)["files"]
    rng = random.Random(0)
    outcomes = {"absent": 0, "previous or new": 0}
    for i in range(KILLS):
        if i % 2:  # half the kills hit a first build, half a rebuild over a good bundle
            subprocess.run(["rm", "-rf", str(out)], check=True)
        existed = out.exists()
        proc = start_build(tiny_gguf, out)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if out.exists():
            try:
                assert verify_bundle(out)["files"] == reference
            except BundleError as e:  # pragma: no cover - the failure this test is for
                raise AssertionError(f"kill {i}: {out} is a partial bundle: {e}") from e
            outcomes["previous or new"] += 1
        else:
            assert not existed, f"kill {i}: the previous bundle disappeared"
            outcomes["absent"] += 1
    assert sum(outcomes.values()) == KILLS and outcomes["absent"] > 0, outcomes
    assert start_build(tiny_gguf, out).wait(timeout=300) == 0  # leftovers do not block a build
    assert verify_bundle(out)["files"] == reference
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # stale work dirs cleaned up
