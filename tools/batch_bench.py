"""Benchmark: continuous batching and the prefix cache, beside the batched peers in the same run.

    python -m infopt.tools.batch_bench [--model M] [--runtime R] [--threads 2] [--streams 8]
        [--peers DIR] [--anchors DIR] [--json]

Throughput is measured as the peers' anchor scripts measure it (`ovgenai_batch_bench.py`,
`ortgenai_batch_bench.py`): greedy requests of 64 new tokens each (end-of-sequence ignored),
"one" = one request alone, "batchN" = N requests started together, the aggregate of their new
tokens over the wall time from the first start to the last end (their prefill included). The
prompts are the anchors' own chat prompts.

The prefix cache: a chat of ten turns (about a thousand tokens of history by the tenth), the
time to the first token of turn ten on the model that served the first nine, against a cold
prefill of the same prompt (a second model of the same file, its cache empty).

With --peers (the folder `tools/peers/setup_peers.sh` fills) and --anchors (the folder holding
the anchor scripts), each peer's anchor runs right after infopt, in the same run, and the ratios
are printed; the CPU's name and ISA flags are printed with every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import infopt
from infopt.device_profiles.host import cpu_info

NEW_TOKENS = 64
TURNS = 10
QUESTIONS = [
    "Tell me about the history of the bicycle.",
    "How do gears on a bicycle work?",
    "What is the best way to maintain a chain?",
    "Why do racing bikes have thin tyres?",
    "How did bicycles change cities?",
    "What are the benefits of cycling to work?",
    "How are carbon frames made?",
    "What should a beginner buy first?",
    "How do electric bicycles differ?",
    "Summarise our conversation in two sentences.",
]


def prompt(i: int) -> list[dict[str, str]]:
    """The anchors' prompt for request i (they send it with the chat template applied)."""
    return [
        {
            "role": "user",
            "content": f"Write a short story about robot number {i} who learns to paint.",
        }
    ]


def run_requests(model: infopt.Model, prompts: list[Any]) -> float:
    """Aggregate new tokens per second of `prompts` started together (one thread each), from
    an empty prefix cache: the rounds repeat prompts, and the peers cache none."""
    model.engine.clear_cache()
    counts: list[int] = [0] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def one(i: int) -> None:
        start.wait()
        r = model.generate(prompts[i], max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        counts[i] = len(r.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert all(c == NEW_TOKENS for c in counts), counts
    return sum(counts) / elapsed


def throughput(model: infopt.Model, streams: int, repeat: int) -> dict[str, float]:
    run_requests(model, [prompt(0)])  # warm-up: first-call costs out of the figures
    run_requests(model, [prompt(i) for i in range(streams)])
    one = max(run_requests(model, [prompt(1 + r)]) for r in range(repeat))
    agg = max(run_requests(model, [prompt(i + r) for i in range(streams)]) for r in range(repeat))
    return {"one": one, f"batch{streams}": agg, "scaling": agg / one}


def agreement(model: infopt.Model, streams: int) -> dict[str, float]:
    """Greedy outputs of `streams` requests decoded together against each one alone: the share
    of requests that match token for token, and of tokens before the first difference (INT4/INT8
    kernels may round a several-row pass unlike a one-row one)."""
    prompts = [prompt(i) for i in range(streams)]
    settings: dict[str, Any] = {
        "max_new_tokens": NEW_TOKENS,
        "stop_token_ids": [],
        "temperature": 0,
    }
    alone = [model.generate(p, **settings).token_ids for p in prompts]
    together: list[list[int]] = [[] for _ in prompts]

    def one(i: int) -> None:
        together[i] = model.generate(prompts[i], **settings).token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = [
        next((k for k, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), NEW_TOKENS)
        for x, y in zip(alone, together, strict=True)
    ]
    return {
        "identical_requests": sum(s == NEW_TOKENS for s in same) / streams,
        "tokens_before_first_difference": sum(same) / (streams * NEW_TOKENS),
    }


def chat_turns(path: str | None, load: dict[str, Any]) -> dict[str, float]:
    """Turn ten's time to first token with the prefix cache, and a cold prefill of it."""
    model = infopt.load(path, **load)
    chat: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
    warm_ttft, cached, prompt_tokens = 0.0, 0, 0
    for turn, question in enumerate(QUESTIONS[:TURNS], start=1):
        chat.append({"role": "user", "content": question})
        r = model.generate(chat, max_new_tokens=100, temperature=0)
        chat.append({"role": "assistant", "content": r.text})
        if turn == TURNS:
            warm_ttft, cached, prompt_tokens = (
                r.stats.ttft_s,
                r.stats.cached_tokens,
                r.stats.prompt_tokens,
            )
    cold_model = infopt.load(path, **load)
    cold_model.generate("warm up", max_new_tokens=2)  # first-call costs out of the figure
    final = chat[:-1]
    colds = []
    for _ in range(3):
        cold_model.engine.clear_cache()
        colds.append(cold_model.generate(final, max_new_tokens=1).stats.ttft_s)
    cold = min(colds)
    return {
        "history_tokens": prompt_tokens,
        "cached_tokens": cached,
        "turn10_ttft_ms": warm_ttft * 1e3,
        "cold_prefill_ttft_ms": cold * 1e3,
        "ratio": warm_ttft / cold,
    }


def peer(script: Path, python: Path, folder: Path, streams: int) -> dict[str, float] | str:
    """One anchor script's one/batchN figures, or why it could not run."""
    if not (script.exists() and python.exists() and folder.exists()):
        return f"missing {script if not script.exists() else folder}"
    out = subprocess.run(
        [str(python), str(script), str(folder), str(streams)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    try:
        one = float(line.split("one=")[1].split()[0])
        agg = float(line.split(f"batch{streams}=")[1].split()[0])
    except (IndexError, ValueError):
        return line
    return {"one": one, f"batch{streams}": agg, "scaling": agg / one}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model file or bundle (default model if omitted)")
    ap.add_argument("--runtime", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--peers", type=Path, default=None, help="tools/peers/setup_peers.sh's folder")
    ap.add_argument("--anchors", type=Path, default=None, help="folder of the anchor scripts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    name, flags, _ = cpu_info()
    load = {"runtime": args.runtime, "threads": args.threads, "slots": args.streams}
    model = infopt.load(args.model, **load)
    result: dict[str, Any] = {
        "cpu": name,
        "flags": list(flags),
        "model": model.source,
        "runtime": model.runtime.name,
        "threads": args.threads,
        "infopt": throughput(model, args.streams, args.repeat),
        "batched_vs_alone": agreement(model, args.streams),
    }
    del model
    result["chat"] = chat_turns(args.model, {**load, "slots": 1})
    if args.peers and args.anchors:
        python = args.peers / "venv" / "bin" / "python"
        for key, script, folder in (
            ("openvino-genai-cb", "ovgenai_batch_bench.py", "ov-int4"),
            ("onnxruntime-genai", "ortgenai_batch_bench.py", "ortgenai-int4"),
        ):
            result[key] = peer(args.anchors / script, python, args.peers / folder, args.streams)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"CPU {name} ({' '.join(flags)}), {args.threads} threads, {result['runtime']}")
    key = f"batch{args.streams}"
    mine = result["infopt"]
    for who in ("infopt", "openvino-genai-cb", "onnxruntime-genai"):
        r = result.get(who)
        if isinstance(r, dict):
            ratio = (
                f"  (infopt {key} / this {key}: {mine[key] / r[key]:.2f}x)"
                if who != "infopt"
                else ""
            )
            print(
                f"{who:20s} one {r['one']:7.1f} tok/s  {key} {r[key]:7.1f} tok/s  "
                f"({r['scaling']:.2f}x){ratio}"
            )
        elif r is not None:
            print(f"{who:20s} not run: {r}")
    a = result["batched_vs_alone"]
    print(
        f"greedy, {args.streams} batched vs alone: {100 * a['identical_requests']:.0f} % of "
        f"requests identical, {100 * a['tokens_before_first_difference']:.1f} % of tokens before "
        "the first difference"
    )
    c = result["chat"]
    print(
        f"chat turn {TURNS}: {c['history_tokens']} prompt tokens, {c['cached_tokens']} cached: "
        f"TTFT {c['turn10_ttft_ms']:.1f} ms vs cold prefill {c['cold_prefill_ttft_ms']:.1f} ms "
        f"({100 * c['ratio']:.1f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
