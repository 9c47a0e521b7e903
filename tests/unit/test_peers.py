"""The bench's peer runs (`infopt.measure.speed.run_peer`), on a peers folder laid out as
tools/peers/setup_peers.sh lays it out, whose bench script stands in for llama.cpp's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infopt.measure.speed import run_peer

LINE = "print('llama.cpp Q4_1 threads=2 pp512=300.5 tok/s tg128=86.0 tok/s')\n"


def peers_with(tmp_path: Path, script: str) -> Path:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "llamacpp_bench.py").write_text(script)
    return tmp_path


def test_a_llama_cpp_that_crashes_is_measured_again_with_repacking_off(tmp_path: Path) -> None:
    # as llama-cpp-python did on an AMX machine: a segmentation fault unless told not to repack
    crashes = (
        "import os, signal\n"
        "if not os.environ.get('LLAMA_NO_EXTRA_BUFTS'):\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    result = run_peer("llama.cpp Q4_1", peers_with(tmp_path, crashes + LINE), 2)
    assert result == {"runtime": "llama.cpp Q4_1 (repacking off)", "pp512": 300.5, "tg128": 86.0}


def test_a_llama_cpp_that_runs_keeps_its_name(tmp_path: Path) -> None:
    result = run_peer("llama.cpp Q4_1", peers_with(tmp_path, LINE), 2)
    assert result == {"runtime": "llama.cpp Q4_1", "pp512": 300.5, "tg128": 86.0}


@pytest.mark.parametrize("script", ["import sys; sys.exit(3)\n", "print('no figures')\n"])
def test_a_peer_that_fails_either_way_gives_no_row(tmp_path: Path, script: str) -> None:
    assert run_peer("llama.cpp Q4_1", peers_with(tmp_path, script), 2) is None
