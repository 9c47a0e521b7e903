"""Load test of `infopt-pack serve` through its HTTP API: N concurrent streaming clients per
level, the same requests at every level, so that runs compare.

    python -m infopt.tools.load_test [--levels 1,2,4,8,16] [--requests 32] [--max-tokens 128]
        [--url http://127.0.0.1:8080 | --model M --runtime R --slots 4 --threads T]
        [--json] [--plot load_test.png]

Without --url it starts `infopt-pack serve` on a free loopback port and stops it at the end.
Per level: aggregate throughput (completion tokens from the usage chunks, over the level's
wall time), requests/s, time to first token p50/p95/p99, inter-token latency p50/p95 (the gaps
between streamed chunks), errors. Requests are greedy with a fixed max_tokens; a model may stop
before it (OpenAI's API has no ignore_eos), so the tokens actually generated are reported. The
JSON records the CPU and its flags, as every benchmark here does. Exits 1 if any request
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from contextlib import nullcontext
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

REQUEST_TIMEOUT_S = 600.0


async def run_level(
    url: str, concurrency: int, requests: int, max_tokens: int, api_key: str | None
) -> dict[str, Any]:
    """`requests` requests, `concurrency` at a time; request i is the same at every level."""
    todo = iter(range(requests))
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                body = chat_body(i, max_tokens)
                samples.append(await stream_chat(client, url, body, headers(api_key)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(concurrency, samples, wall)


def summarize(concurrency: int, samples: list[Sample], wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens or 0 for s in ok)
    errors = Counter(s.error for s in samples if not s.ok)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "prompt_tokens_per_request": (
            round(sum(s.prompt_tokens or 0 for s in ok) / len(ok), 1) if ok else None
        ),
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_ms": percentiles([s.ttft_s for s in ok if s.ttft_s is not None], (50, 95, 99)),
        "itl_ms": percentiles([g for s in ok for g in s.gaps_s], (50, 95)),
    }


async def run_all(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    if args.warmup:  # first requests pay for lazy set-up (kernels, allocator pools)
        await run_level(url, 1, args.warmup, args.max_tokens, args.api_key)
    levels = []
    for concurrency in args.levels:
        level = await run_level(url, concurrency, args.requests, args.max_tokens, args.api_key)
        levels.append(level)
        if not args.json:
            print(f"  concurrency {concurrency}: done in {level['wall_s']:.1f} s", file=sys.stderr)
    return levels


def print_table(report: dict[str, Any]) -> None:
    from infopt.cli.output import table

    server, machine = report["server"], report["host"]
    heads = ["clients", "ok", "errors", "tok/s", "req/s", "tokens/req"]
    heads += ["TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p95 ms"]
    cells = []
    for lv in report["levels"]:
        ttft, itl = lv["ttft_ms"], lv["itl_ms"]
        cells.append(
            [
                lv["concurrency"],
                lv["ok"],
                lv["errors"],
                _fmt(lv["throughput_tok_s"], 1),
                _fmt(lv["requests_per_s"], 2),
                _fmt(lv["tokens_per_request"], 1),
                *(_fmt(ttft[k], 0) for k in ("p50", "p95", "p99")),
                *(_fmt(itl[k], 1) for k in ("p50", "p95")),
            ]
        )
    title = (
        f"{server['model']} ({server['runtime'] or 'runtime not known'}), {server['slots']} "
        f"slots, max_tokens {report['max_tokens']}, {report['requests_per_level']} requests a "
        f"level; {machine['cpu']} "
        f"({' '.join(machine['cpu_flags'])}), {machine['cores']} cores"
    )
    table(heads, cells, title=title)
    print("tok/s: completion tokens (usage) over the level's wall time; ITL: gaps between chunks")
    for lv in report["levels"]:
        for error, count in lv["error_kinds"].items():
            print(f"  {lv['concurrency']} clients: {count} x {error}")


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(x, [lv["throughput_tok_s"] or 0 for lv in levels], "o-")
    left.set(xlabel="concurrent clients", ylabel="completion tokens/s", title="Throughput")
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        right.plot(x, [lv["ttft_ms"][q] for lv in levels], style, label=q)
    right.set(xlabel="concurrent clients", ylabel="ms", title="Time to first token")
    right.legend()
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.grid(alpha=0.3)
    machine, server = report["host"], report["server"]
    fig.suptitle(
        f"{server.get('model')}, {server.get('slots')} slots, max_tokens {report['max_tokens']}"
        f" — {machine['cpu']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infopt.tools.load_test",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--levels",
        default="1,2,4,8,16",
        help="Concurrent clients per level, comma-separated (default 1,2,4,8,16).",
    )
    parser.add_argument("--requests", type=int, default=32, help="Requests per level.")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request.")
    parser.add_argument("--warmup", type=int, default=2, help="Unmeasured requests first.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--plot", default="load_test.png", help="PNG of throughput and TTFT.")
    parser.add_argument("--no-plot", action="store_true", help="Write no plot.")
    add_server_options(parser)
    args = parser.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--levels {args.levels!r}: expected integers separated by commas")
    if not args.levels or min(args.levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--levels, --requests and --max-tokens must be positive")
    if args.url and (args.model or args.runtime or args.threads or args.context):
        parser.error("--model, --runtime, --threads and --context start a server: not with --url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the largest level must never be refused for a full queue
    own = (
        Server(args.model, server_args(args, queue=max(args.levels)), args.api_key)
        if not args.url
        else None
    )
    with own or nullcontext():
        url = own.url if own else args.url.rstrip("/")
        state = health(url)
        if not args.json:
            where = f"started here (pid {own.pid})" if own else "given"
            print(f"server {url} {where}: {state.get('model')}", file=sys.stderr)
        levels = asyncio.run(run_all(args, url))
    report = {
        "tool": "load_test",
        "host": host(),
        "server": {
            "url": url,
            "started_here": own is not None,
            "model": state.get("model"),
            "slots": state.get("slots"),
            "runtime": own.runtime if own else None,  # a given server does not say
            "threads": args.threads,
        },
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "levels": levels,
    }
    if not args.no_plot:
        plot(report, args.plot)
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        if not args.no_plot:
            print(f"plot: {args.plot}")
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
