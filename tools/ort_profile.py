"""Where a forward pass of an ONNX Runtime bundle spends its time, per operator type.

    python -m infopt.tools.ort_profile BUNDLE [--tokens 32] [--runs 10] [--rows N] [--threads 2]
                                              [--json]

Loads the bundle's ONNX Runtime artifact with onnxruntime's own profiler on, runs `--runs`
prefills of `--tokens` tokens (a first one, a warm-up, not counted), and prints the
milliseconds per run of each operator type and of the whole `model_run`, most expensive first.
With `--tokens 32` this is the time to the first token of the runtime table's TTFT prompt, taken
apart. With `--rows N`, N KV rows each read the prompt first (not counted), then each run is one
decode step of all N rows together, as the engine runs N concurrent requests (`--rows 1`: one
request's decode step after its prompt).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any


def profile(bundle: str, tokens: int, runs: int, threads: int, rows: int = 0) -> dict[str, Any]:
    import onnxruntime as ort

    from infopt.bundle import open_bundle
    from infopt.runtimes.onnxruntime import runtime as ort_runtime

    opened = open_bundle(bundle)
    root, artifact = opened.root, opened.artifact("onnxruntime").entry
    vocab = opened.spec.vocab_size
    ids = opened.tokenizer.encode("Tell me a story about a dragon who paints.")
    prompt = (ids * (tokens // max(len(ids), 1) + 1))[:tokens]
    with tempfile.TemporaryDirectory(prefix="infopt-profile-") as folder:
        so = ort_runtime.session_options(threads)  # the runtime's own settings, profiler on
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(folder) / "ort")
        graph = root / artifact["files"][0]
        session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        rt = ort_runtime.ONNXRuntime(session, int(artifact["max_context"]), vocab, rows=rows or 1)
        if rows:
            for row in range(rows):
                rt.select(row)
                rt.forward(prompt, only_last=True)
            for _ in range(runs + 1):
                if rows == 1:  # one row's decode step
                    rt.forward(prompt[-1:], only_last=True)
                else:
                    rt.decode_batch([prompt[-1]] * rows)
        else:
            for _ in range(runs + 1):
                rt.reset()
                rt.forward(prompt, only_last=True)
        events = json.loads(Path(session.end_profiling()).read_text())
    passes = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    # the last `runs` runs, not the warm-up nor the rows' prompts: a decode step is one pass,
    # a prompt longer than one prefill chunk several
    per_run = 1 if rows else len(passes) // (runs + 1)
    passes = passes[-runs * per_run :]
    totals: collections.Counter[str] = collections.Counter()
    totals["model_run"] = sum(end - start for start, end in passes)
    for e in events:
        kernel = e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        if kernel and any(start <= e["ts"] <= end for start, end in passes):
            totals[e["args"]["op_name"]] += e["dur"]
    return {
        "bundle": bundle,
        "tokens": tokens,
        "rows": rows,
        "runs": runs,
        "ms_per_run": {k: v / 1000 / runs for k, v in totals.most_common()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m infopt.tools.ort_profile",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("bundle", help="a bundle with an ONNX Runtime artifact, or a cache entry")
    ap.add_argument("--tokens", type=int, default=32, help="prompt tokens (default: 32)")
    ap.add_argument("--runs", type=int, default=10, help="passes counted (default: 10)")
    ap.add_argument(
        "--rows", type=int, default=0, help="profile decode steps of N rows together (default: off)"
    )
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    ap.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    args = ap.parse_args()
    for flag, value, least in (
        ("--tokens", args.tokens, 1),
        ("--runs", args.runs, 1),
        ("--rows", args.rows, 0),
        ("--threads", args.threads, 1),
    ):
        if value < least:
            ap.error(f"{flag} {value}: must be at least {least}")
    from infopt.errors import InfoptError

    try:
        out = profile(args.bundle, args.tokens, args.runs, args.threads, args.rows)
    except InfoptError as e:  # a bundle that is not one, a graph that cannot batch, ...
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    rows = "1 row" if args.rows == 1 else f"{args.rows} rows"
    what = f"{rows}, one decode step of each" if args.rows else f"{args.tokens} tokens"
    print(f"{out['bundle']}: {what} per run, {out['runs']} run(s), ms per run")
    for op, ms in out["ms_per_run"].items():
        print(f"  {op:<36} {ms:8.2f}")


if __name__ == "__main__":
    main()
