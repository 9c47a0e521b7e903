"""tools/load_test.py and tools/soak.py, run small against a tiny-model server of their own
(`infopt-pack serve` on a free loopback port)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from infopt.tools import load_test, soak
from infopt.tools.http_load import Server, health


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[Server]:
    args = ["--runtime", "pytorch", "--slots", "2", "--max-queue", "4", "--context", "128"]
    with Server(str(tiny_gguf), args) as s:
        yield s


def run_json(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(argv)  # type: ignore[operator]
    return code, json.loads(capsys.readouterr().out)


def test_load_test_levels_tokens_and_plot(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "load.png"
    argv = ["--url", server.url, "--levels", "1,2", "--requests", "3", "--max-tokens", "8"]
    code, report = run_json(
        load_test.main, [*argv, "--warmup", "1", "--json", "--plot", str(plot)], capsys
    )
    assert code == 0, report
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert (lv["requests"], lv["ok"], lv["errors"]) == (3, 3, 0)
        assert 0 < lv["completion_tokens"] <= 3 * 8 and lv["throughput_tok_s"] > 0
        assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p95"] <= lv["ttft_ms"]["p99"]
    assert report["server"]["slots"] == 2 and isinstance(report["host"]["cpu_flags"], list)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_passes_with_clients_leaving(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", server.url, "--pid", str(server.pid), "--requests", "12", "--warmup", "4"]
    argv += ["--concurrency", "3", "--disconnect", "0.25", "--max-tokens", "16", "--json"]
    code, report = run_json(soak.main, argv, capsys)
    assert code == 0, report
    assert report["requests"] == 16 and report["failed"] == 0
    assert report["disconnected"] >= 1
    assert report["completed"] + report["disconnected"] == 16
    assert report["health_at_end"]["busy"] == 0 and report["rss"]["growth"] is not None
    assert health(server.url)["busy"] == 0


def test_soak_fails_when_requests_fail(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    # past the context: the server refuses every request with a 400
    argv = ["--url", server.url, "--requests", "3", "--warmup", "0", "--max-tokens", "1000"]
    code, report = run_json(soak.main, [*argv, "--json"], capsys)
    assert code == 1 and not report["passed"] and report["failed"] == 3
    assert "HTTP 400" in next(iter(report["failures"]))
