"""Runtime benchmark: bundles on their runtimes, beside the peers, in one session.

    python -m infopt.tools.runtime_bench BUNDLE [BUNDLE ...] [--runtime R] [--threads 2]
        [--repeat 3] [--compare] [--peers /tmp/infopt-peers] [--json | --markdown]
    python -m infopt.tools.runtime_bench --matrix DIR [--tflite] [--compare] --markdown  # docs

Each measurement runs in a fresh process (so its memory is its own): load the bundle, then
- TTFT: a 32-token prompt, call start to the first sampled token (`Stats.ttft_s`);
- pp512: one prefill of 512 tokens (`forward(only_last=True)`), tokens/s;
- tg128: 128 greedy tokens after the chat prompt of the anchors' scripts, tokens/s over the
  steps after the first, with the p50/p95/p99 latency of those steps;
- peak RSS while generating (the counter is reset after loading; Linux), and at load; the
  process before loading (interpreter, runtime package), and the tokenizer alone (its own
  fresh process), so that what the model itself takes can be told from what any app pays.
Runs alternate over the systems `--repeat` times and medians are reported, so the machine's
drift hits every system alike. `--compare` also runs the peers of `../shared/anchors/` (llama.cpp,
ONNX Runtime GenAI, OpenVINO GenAI, transformers) from the virtual environment that
`setup_peers.sh` made (`--peers`), and prints ratios against the best peer. `--matrix DIR`
builds (once) fp32, INT8, INT4 and all-INT4 bundles of the default model, each with all three
CPU artifacts, under DIR and benchmarks every runtime of each; `--tflite` adds fp32, INT8 and
INT4 (symmetric) bundles with a LiteRT artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
PREFILL, DECODE, TTFT_TOKENS = 512, 128, 32
# The peers' bench scripts: $INFOPT_ANCHORS, or ../shared/anchors beside the working directory
# (a checkout of this repository); only this optional comparison ever looks there.
ANCHORS = Path(os.environ.get("INFOPT_ANCHORS", Path.cwd().parent / "shared" / "anchors"))
CPU_RUNTIMES = ("onnxruntime", "openvino", "pytorch")
RUNTIMES = (*CPU_RUNTIMES, "tflite")
DEFAULT_PEERS = Path("/tmp/infopt-peers")
HEAD8 = {"embeddings": "int8", "lm_head": "int8"}
MATRIX = {  # bundle name -> weights of every tensor group
    "fp32": {"embeddings": "fp32", "lm_head": "fp32", "attention": "fp32", "mlp": "fp32"},
    "int8": {**HEAD8, "attention": "int8", "mlp": "int8"},
    "int4": {**HEAD8, "attention": "int4-g32", "mlp": "int4-g32"},
    # every group INT4, LM head included, as ONNX Runtime GenAI's builder makes it
    "int4-all": {g: "int4-g32" for g in ("embeddings", "lm_head", "attention", "mlp")},
}
# LiteRT bundles of their own: its INT4 is symmetric (the build makes it so), which would change
# the CPU bundles' INT4 if they shared one
TFLITE_MATRIX = {
    "tflite-fp32": MATRIX["fp32"],
    "tflite-int8": MATRIX["int8"],
    "tflite-int4": {**HEAD8, "attention": "int4s-g32", "mlp": "int4s-g32"},
}


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def tokenizer_rss(bundle: str) -> int:
    """Resident bytes the bundle's tokenizer keeps, loaded alone in a fresh process: measured
    after glibc's malloc_trim, since half of what loading touches is the JSON parser's freed
    memory (16 of 32 MB for the default model's), which a process loading a model reuses."""
    script = (
        "import ctypes, re, sys\n"
        "from pathlib import Path\n"
        "import tokenizers\n"
        "from infopt.bundle import bundle_tokenizer, verify_bundle\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "trim = getattr(ctypes.CDLL(None), 'malloc_trim', lambda pad: 0)\n"
        "manifest = verify_bundle(sys.argv[1])\n"
        "trim(0)\n"
        "before = rss()\n"
        "tok = bundle_tokenizer(Path(sys.argv[1]), manifest)\n"
        "trim(0)\n"
        "print(1024 * (rss() - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, bundle], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 else 0


def measure(bundle: str, runtime: str | None, threads: int) -> dict[str, Any]:
    """One fresh-process measurement of a bundle (called in the child)."""
    import numpy as np

    import infopt
    from infopt.bundle import verify_bundle
    from infopt.generate import stream_generate
    from infopt.runtimes import runtime_module
    from infopt.sampling import SamplingParams

    manifest = verify_bundle(bundle)
    name = runtime or manifest["runtime"]["name"]
    tokenizer = tokenizer_rss(bundle)
    runtime_module(name)  # the runtime's package imported: what a process needs before a model
    baseline = _status_kb("VmRSS") * 1024
    model = infopt.load(bundle, runtime=runtime, threads=threads)
    load_peak = _status_kb("VmHWM") * 1024
    files = set(manifest["artifacts"][name]["files"])
    weights = sum(f["size"] for f in manifest["files"] if f["path"] in files)
    cfg = manifest["model"]["config"]
    kv = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 4
    kv_bytes = kv * model.runtime.max_context
    ids = model.encode_prompt(PROMPT)
    long = (ids * 40)[:PREFILL]
    short = (ids * 4)[:TTFT_TOKENS]
    params = SamplingParams()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: measure generation alone
        f.write("5")
    model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])  # warm-up
    ttft = []
    for _ in range(3):
        first = next(
            iter(
                stream_generate(
                    model.runtime, model.tokenizer, short, max_new_tokens=1, params=params
                )
            )
        )
        ttft.append(first.stats.ttft_s)
    model.runtime.reset()
    t = time.perf_counter()
    model.runtime.forward(long, only_last=True)
    pp = PREFILL / (time.perf_counter() - t)
    steps, last = [], time.perf_counter()
    for n, _r in enumerate(
        stream_generate(model.runtime, model.tokenizer, ids, max_new_tokens=DECODE, params=params)
    ):
        now = time.perf_counter()
        if n:
            steps.append(now - last)
        last = now
    lat = np.array(steps) * 1000
    return {
        "runtime": name,
        "ttft_ms": 1000 * min(ttft),
        "prompt_tokens_ttft": TTFT_TOKENS,
        "pp512": pp,
        "tg128": len(steps) / sum(steps),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "peak_rss": _status_kb("VmHWM") * 1024,
        "load_peak_rss": load_peak,
        "baseline_rss": baseline,
        "tokenizer_rss": tokenizer,
        "weights_bytes": weights,
        "kv_bytes": kv_bytes,
        "max_context": model.runtime.max_context,
    }


def run_child(bundle: str, runtime: str | None, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "infopt.tools.runtime_bench",
        "--child",
        bundle,
        "--threads",
        str(threads),
    ] + (["--runtime", runtime] if runtime else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


PEER_SCRIPTS = {  # peer -> (script, argument under the peers dir or None)
    "llama.cpp Q4_1": ("llamacpp_bench.py", None),
    "ONNX Runtime GenAI int4": ("ortgenai_bench.py", "ortgenai-int4"),
    "OpenVINO GenAI int4": ("ovgenai_bench.py", "ov-int4"),
    "transformers fp32": ("hf_bench.py", None),
}


def run_peer(name: str, peers: Path, threads: int) -> dict[str, Any] | None:
    script, arg = PEER_SCRIPTS[name]
    path = ANCHORS / script
    python = peers / "venv" / "bin" / "python"
    if not path.exists() or not python.exists():
        return None
    cmd = [str(python), str(path)] + ([str(peers / arg)] if arg else [])
    env = {**os.environ, "THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else ""
    found = {k: float(v) for k, v in re.findall(r"(pp512|tg128|ttft)=([\d.]+)", line)}
    if not found:
        return None
    result: dict[str, Any] = {"runtime": name}
    result.update({k: found[k] for k in ("pp512", "tg128") if k in found})
    if "ttft" in found:
        result["ttft_ms"] = found["ttft"]
    return result


def build_edited(
    bundle: Path, label: str, weights: dict[str, str], runtimes: str, **options: Any
) -> None:
    """Build `bundle` (unless it exists) from this machine's host plan (1,024-token context)
    with every tensor group's weights set as `weights` says, no pruning, no low rank."""
    from infopt.build import build
    from infopt.bundle import is_bundle

    if is_bundle(bundle):
        return
    cmd = [sys.executable, "-m", "infopt.cli", "plan", "-d", "host", "--context", "1024", "--json"]
    data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    data["compression"]["weights"] = weights
    data["compression"]["name"] = f"{label} (edited host plan)"
    data["pruning"], data["low_rank_ratio"] = {"kind": "none", "sparsity": 0.0}, None
    plan_file = bundle.parent / f"{bundle.name}.plan.json"
    plan_file.write_text(json.dumps(data))
    build(None, bundle, plan_file=plan_file, runtime=runtimes, **options)


def build_matrix(folder: Path, tflite: bool = False) -> list[tuple[str, str]]:
    """(label, bundle) of the fp32 / INT8 / INT4 bundles, built with the three CPU artifacts
    (and, with `tflite`, fp32 / INT8 / INT4 bundles with a LiteRT artifact and a PyTorch one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for label, weights in MATRIX.items():
        build_edited(folder / label, label, weights, ",".join(CPU_RUNTIMES))
    pairs = [(label, str(folder / label)) for label in MATRIX]
    for label, weights in TFLITE_MATRIX.items() if tflite else ():
        build_edited(folder / label, label.removeprefix("tflite-"), weights, "tflite,pytorch")
        pairs.append((label.removeprefix("tflite-"), str(folder / label)))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--runtime", help="only this runtime (default: every artifact of a bundle)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--matrix", type=Path, help="build and bench fp32/INT8/INT4 bundles here")
    ap.add_argument("--tflite", action="store_true", help="with --matrix: LiteRT bundles too")
    ap.add_argument("--compare", action="store_true", help="run the peers too")
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.runtime, args.threads)))
        return
    pairs = (
        build_matrix(args.matrix, args.tflite)
        if args.matrix
        else [(Path(b).name, b) for b in args.bundles]
    )
    rows = bench(
        pairs,
        runtime=args.runtime,
        threads=args.threads,
        repeat=args.repeat,
        compare=args.compare,
        peers=args.peers,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(rows, indent=2) if args.json else table(rows, args.threads, args.markdown))


def systems(
    bundles: list[tuple[str, str]], runtime: str | None, compare: bool
) -> list[tuple[str, str | None, str | None]]:
    """(label, bundle or None for a peer, runtime or peer name) of everything to measure."""
    from infopt.bundle import verify_bundle

    out: list[tuple[str, str | None, str | None]] = []
    for label, bundle in bundles:
        artifacts = verify_bundle(bundle)["artifacts"]
        found = [r for r in RUNTIMES if r in artifacts]
        if "tflite" in found:  # a LiteRT bundle's PyTorch artifact is its reference, not a system
            found = ["tflite"]
        for rt in [runtime] if runtime else found:
            out.append((f"infopt {rt} {label}", bundle, rt))
    if compare:
        out += [(name, None, name) for name in PEER_SCRIPTS]
    return out


def bench(
    bundles: list[tuple[str, str]],
    *,
    runtime: str | None = None,
    threads: int = 2,
    repeat: int = 3,
    compare: bool = False,
    peers: Path = DEFAULT_PEERS,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Median figures per system over `repeat` alternating rounds."""
    todo = systems(bundles, runtime, compare)
    if compare and not (ANCHORS.is_dir() and (peers / "venv" / "bin" / "python").exists()):
        raise SystemExit(
            f"--compare needs the peers' scripts in {ANCHORS} (set INFOPT_ANCHORS) and the "
            f"environment setup_peers.sh makes in {peers} (--peers)"
        )
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in todo}
    for _ in range(repeat):
        for label, bundle, rt in todo:
            r = (
                run_peer(str(rt), peers, threads)
                if bundle is None
                else run_child(bundle, rt, threads)
            )
            if r is None:
                continue
            runs[label].append(r)
            if log:
                log(f"{label}: {json.dumps(r)}")
    rows = []
    for label, results in runs.items():
        if not results:
            continue
        row: dict[str, Any] = {"system": label, "peer": not label.startswith("infopt ")}
        for key in results[0]:
            values = [r[key] for r in results if isinstance(r.get(key), int | float)]
            row[key] = statistics.median(values) if values else results[0][key]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], threads: int, markdown: bool) -> str:
    peers = [r for r in rows if r["peer"]]
    best_tg = max((r["tg128"] for r in peers if "tg128" in r), default=None)
    best_pp = max((r["pp512"] for r in peers if "pp512" in r), default=None)
    head = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} "
        f"threads, medians of alternating runs"
    )
    cols = [
        "system",
        "TTFT ms (32 tok)",
        "pp512 tok/s",
        "tg128 tok/s",
        "p50 / p95 / p99 ms",
        "peak RSS MB (before loading)",
        "weights + KV MB",
        "peak − before loading MB (tokenizer) × weights + KV",
        "tg128 vs best peer",
        "pp512 vs best peer",
    ]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def fmt(r: dict[str, Any], key: str, spec: str) -> str:
        return format(r[key], spec) if key in r else ""

    for r in rows:
        lat = f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} / {r['p99_ms']:.1f}" if "p50_ms" in r else ""
        mem = (
            f"{r['peak_rss'] / 1e6:.0f} ({r['baseline_rss'] / 1e6:.0f})" if "peak_rss" in r else ""
        )
        wkv = f"{(r['weights_bytes'] + r['kv_bytes']) / 1e6:.0f}" if "kv_bytes" in r else ""
        grown = ""
        if "tokenizer_rss" in r:
            model = r["peak_rss"] - r["baseline_rss"]
            grown = (
                f"{model / 1e6:.0f} ({r['tokenizer_rss'] / 1e6:.0f}) "
                f"{model / (r['weights_bytes'] + r['kv_bytes']):.2f}×"
            )
        tg_ratio = f"{r['tg128'] / best_tg:.2f}×" if best_tg and "tg128" in r else ""
        pp_ratio = f"{r['pp512'] / best_pp:.2f}×" if best_pp and "pp512" in r else ""
        cells = [
            r["system"],
            fmt(r, "ttft_ms", ".1f"),
            fmt(r, "pp512", ".0f"),
            fmt(r, "tg128", ".1f"),
            lat,
            mem,
            wkv,
            grown,
            tg_ratio,
            pp_ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if markdown else "\n".join(lines).replace("|", " ")


if __name__ == "__main__":
    main()
