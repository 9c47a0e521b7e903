"""The bench's peer runs (`infopt.measure.speed.run_peer`), on a peers folder laid out as
tools/peers/setup_peers.sh lays it out, whose bench script stands in for llama.cpp's: it
records each run's LLAMA_NO_EXTRA_BUFTS in a file beside it, then does what the test asks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infopt.measure import speed
from infopt.measure.speed import run_peer

RECORD = (
    "import os, pathlib, resource, signal, sys\n"
    "here = pathlib.Path(__file__).parent\n"
    "off = os.environ.get('LLAMA_NO_EXTRA_BUFTS') == '1'\n"
    "with open(here / 'runs', 'a') as f:\n"
    "    f.write('off\\n' if off else 'default\\n')\n"
)
# as llama-cpp-python did on an AMX machine: a segmentation fault with its extra buffer types
CRASH = (
    "if not off:\n"
    "    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file\n"
    "    os.kill(os.getpid(), signal.SIGSEGV)\n"
)
FIGURES = (
    "print('llama.cpp Q4_1 threads=2 pp512=300.5 tok/s tg128=86.0 tok/s'"
    " + (' extra_bufts=off' if off else ''))\n"
)


@pytest.fixture(autouse=True)
def no_fallback_yet() -> Iterator[None]:
    speed.FELL_BACK.clear()
    yield
    speed.FELL_BACK.clear()


def peers_with(tmp_path: Path, body: str) -> Path:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "llamacpp_bench.py").write_text(RECORD + body)
    return tmp_path


def runs(peers: Path) -> list[str]:
    return (peers / "bench" / "runs").read_text().split()


def test_a_crashing_llama_cpp_is_measured_with_repacking_off_from_then_on(tmp_path: Path) -> None:
    peers = peers_with(tmp_path, CRASH + FIGURES)
    expected = {"runtime": "llama.cpp Q4_1 (repacking off)", "pp512": 300.5, "tg128": 86.0}
    assert run_peer("llama.cpp Q4_1", peers, 2) == expected
    assert runs(peers) == ["default", "off"]
    # the next rounds measure as the first fallback did, without crashing again first
    assert run_peer("llama.cpp Q4_1", peers, 2) == expected
    assert runs(peers) == ["default", "off", "off"]


def test_a_llama_cpp_that_runs_keeps_its_name(tmp_path: Path) -> None:
    peers = peers_with(tmp_path, FIGURES)
    assert run_peer("llama.cpp Q4_1", peers, 2) == {
        "runtime": "llama.cpp Q4_1",
        "pp512": 300.5,
        "tg128": 86.0,
    }
    assert runs(peers) == ["default"]


def test_a_failure_that_is_no_crash_is_not_run_again(tmp_path: Path) -> None:
    peers = peers_with(tmp_path, "if not off:\n    sys.exit(3)\n" + FIGURES)
    assert run_peer("llama.cpp Q4_1", peers, 2) is None
    assert runs(peers) == ["default"]


def test_a_crash_either_way_or_no_figures_gives_no_row(tmp_path: Path) -> None:
    peers = peers_with(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert run_peer("llama.cpp Q4_1", peers, 2) is None
    assert runs(peers) == ["default", "off"]
    speed.FELL_BACK.clear()
    quiet = peers_with(tmp_path / "quiet", "print('no figures')\n")
    assert run_peer("llama.cpp Q4_1", quiet, 2) is None


def test_another_model_file_is_given_to_llama_cpp_and_names_its_row(tmp_path: Path) -> None:
    peers = peers_with(tmp_path, "(here / 'args').write_text(' '.join(sys.argv[1:]))\n" + FIGURES)
    row = run_peer("llama.cpp Q4_1", peers, 2, "/models/gemma-3-270m-q4_k_m.gguf")
    assert row == {"runtime": "llama.cpp gemma-3-270m-q4_k_m.gguf", "pp512": 300.5, "tg128": 86.0}
    assert (peers / "bench" / "args").read_text() == "/models/gemma-3-270m-q4_k_m.gguf"
