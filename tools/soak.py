"""Soak test of `infopt-pack serve`: many streaming requests, a share of whose clients leave
mid-stream, checking that the server stays correct and does not leak.

    python -m infopt.tools.soak [--requests 1000] [--concurrency 8] [--disconnect 0.2]
        [--url http://127.0.0.1:8080 --pid PID | --model M --runtime R --slots 4]
        [--max-tokens 48] [--rss-limit 0.10] [--json]

Without --url it starts `infopt-pack serve` on a free loopback port (and so knows its PID) and
stops it at the end. Passes when: every request whose client stays completes (status 200, a
finish reason, [DONE]); /health shows no busy slot and nothing queued at the end; the server's
resident memory grew less than --rss-limit from after the warm-up to the end. Prints the
figures (or --json) and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx

from infopt.tools.http_load import (
    Sample,
    Server,
    add_server_options,
    chat_body,
    headers,
    health,
    host,
    percentiles,
    server_args,
    stream_chat,
)

REQUEST_TIMEOUT_S = 300.0
IDLE_TIMEOUT_S = 30.0  # for the last cut streams to reach their next token and free their slot
RSS_EVERY_S = 0.5


def rss_bytes(pid: int) -> int:
    """Resident set size of a process: /proc on Linux, else psutil."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


async def run_requests(
    url: str,
    ids: range,
    concurrency: int,
    leaving: dict[int, int],
    args: argparse.Namespace,
    on_tick: Any = None,
) -> list[Sample]:
    """Requests `ids`, `concurrency` at a time; request i, if in `leaving`, disconnects after
    leaving[i] content chunks. `on_tick` is called every RSS_EVERY_S while they run."""
    todo = iter(ids)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                body = chat_body(i, args.max_tokens)
                key = headers(args.api_key)
                samples.append(await stream_chat(client, url, body, key, leaving.get(i)))

        async def ticker() -> None:
            while True:
                on_tick()
                await asyncio.sleep(RSS_EVERY_S)

        tick = asyncio.create_task(ticker()) if on_tick else None
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            if tick:
                tick.cancel()
    return samples


def wait_idle(url: str) -> dict[str, Any]:
    """/health once nothing runs or waits, or the last state seen after IDLE_TIMEOUT_S."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        state = health(url)
        if (state.get("busy"), state.get("queued")) == (0, 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def soak(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    total = args.warmup + args.requests
    # who leaves, and after how many chunks: fixed by the seed, whatever the scheduling
    leaving = {
        i: rng.randint(1, max(1, args.max_tokens // 2))
        for i in sorted(rng.sample(range(total), round(args.disconnect * total)))
    }
    start = time.perf_counter()
    # the warm-up has the run's mix, so that pools grown for cut streams count as the base
    warm = asyncio.run(run_requests(url, range(args.warmup), args.concurrency, leaving, args))
    wait_idle(url)
    base = rss_bytes(pid) if pid else None
    peak = [base or 0]

    def sample_rss() -> None:
        if pid:
            peak[0] = max(peak[0], rss_bytes(pid))

    ids = range(args.warmup, total)
    samples = asyncio.run(run_requests(url, ids, args.concurrency, leaving, args, sample_rss))
    end_state = wait_idle(url)
    end = rss_bytes(pid) if pid else None
    r = report(args, url, pid, warm + samples, end_state, base, end, peak[0], start)
    r["planned_disconnects"] = len(leaving)  # more than left: some answers ended first
    return r


def report(
    args: argparse.Namespace,
    url: str,
    pid: int | None,
    samples: list[Sample],
    state: dict[str, Any],
    base: int | None,
    end: int | None,
    peak: int,
    start: float,
) -> dict[str, Any]:
    failed = [s for s in samples if not s.ok and not s.disconnected]
    growth = (end - base) / base if base and end else None
    checks = {
        "all_staying_requests_completed": not failed,
        "idle_at_end": (state.get("busy"), state.get("queued")) == (0, 0),
        "rss_growth_below_limit": growth is not None and growth < args.rss_limit,
    }
    if pid is None:
        checks.pop("rss_growth_below_limit")  # nothing to measure without the server's PID
    done = [s for s in samples if s.ok]
    return {
        "tool": "soak",
        "host": host(),
        "server": {
            "url": url,
            "pid": pid,
            "model": state.get("model"),
            "slots": state.get("slots"),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("requests", "warmup", "concurrency", "disconnect", "max_tokens", "seed")
        },
        "duration_s": round(time.perf_counter() - start, 1),
        "requests": len(samples),
        "completed": len(done),
        "disconnected": sum(s.disconnected for s in samples),
        "failed": len(failed),
        "failures": dict(Counter(s.error for s in failed).most_common(5)),
        "completion_tokens": sum(s.completion_tokens or 0 for s in done),
        "latency_ms": percentiles([s.total_s for s in done], (50, 95, 99)),
        "ttft_ms": percentiles([s.ttft_s for s in done if s.ttft_s is not None], (50, 95)),
        "health_at_end": state,
        "rss": {
            "after_warmup_mb": _mb(base),
            "end_mb": _mb(end),
            "peak_mb": _mb(peak) if pid else None,
            "growth": round(growth, 4) if growth is not None else None,
            "limit": args.rss_limit,
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


def _mb(n: int | None) -> float | None:
    return round(n / 2**20, 1) if n else None


def print_report(r: dict[str, Any]) -> None:
    from infopt.cli.output import rows

    rss, health_end = r["rss"], r["health_at_end"]
    growth = (
        f"{rss['growth']:+.1%} (limit {rss['limit']:.0%})" if rss["growth"] is not None else "-"
    )
    rows(
        [
            ("server", f"{r['server']['url']} (pid {r['server']['pid'] or 'unknown'})"),
            ("requests", f"{r['requests']} (warm-up included) in {r['duration_s']} s"),
            ("completed", r["completed"]),
            (
                "disconnected on purpose",
                f"{r['disconnected']} of {r['planned_disconnects']} planned",
            ),
            ("failed", r["failed"]),
            ("latency p50/p95/p99 ms", "/".join(str(v) for v in r["latency_ms"].values())),
            (
                "health at end",
                ", ".join(f"{k} {health_end.get(k)}" for k in ("busy", "queued", "cancelled")),
            ),
            ("RSS after warm-up", f"{rss['after_warmup_mb']} MB"),
            ("RSS at end / peak", f"{rss['end_mb']} / {rss['peak_mb']} MB"),
            ("RSS growth", growth),
        ]
    )
    for error, count in r["failures"].items():
        print(f"  {count} x {error}")
    for name, ok in r["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infopt.tools.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--requests", type=int, default=1000, help="Measured requests.")
    parser.add_argument("--warmup", type=int, default=50, help="Requests before the RSS base.")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests at once.")
    parser.add_argument(
        "--disconnect", type=float, default=0.2, help="Share of clients leaving mid-stream."
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens per request.")
    parser.add_argument("--rss-limit", type=float, default=0.10, help="Largest RSS growth.")
    parser.add_argument("--seed", type=int, default=0, help="Who leaves, and when.")
    parser.add_argument("--pid", type=int, help="The PID of the --url server, for its RSS.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of lines.")
    add_server_options(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--requests, --concurrency and --max-tokens must be positive")
    if not 0 <= args.disconnect <= 1:
        parser.error(f"--disconnect {args.disconnect}: a share between 0 and 1")
    if args.url and (args.model or args.runtime or args.threads or args.context):
        parser.error("--model, --runtime, --threads and --context start a server: not with --url")
    if args.pid and not args.url:
        parser.error("--pid is the PID of the --url server; without --url the tool starts one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own = (
        Server(args.model, server_args(args, queue=args.concurrency), args.api_key)
        if not args.url
        else None
    )
    with own or nullcontext():
        url = own.url if own else args.url.rstrip("/")
        pid = own.pid if own else args.pid
        if not args.json:
            print(f"soaking {url}: {args.warmup} + {args.requests} requests", file=sys.stderr)
        r = soak(args, url, pid)
        r["server"]["runtime"] = own.runtime if own else None
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
        if pid is None:
            print("RSS not checked: give the server's --pid")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
