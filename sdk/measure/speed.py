"""Speed and memory of a bundle on its runtimes, beside the peers, in one session.

Each measurement runs in a fresh process (so its memory is its own): load the bundle, then
- TTFT: a 32-token prompt, call start to the first sampled token (`Stats.ttft_s`);
- pp512: one prefill of 512 tokens (`forward(only_last=True)`), tokens/s;
- tg128: 128 greedy tokens after a chat prompt, tokens/s over the steps after the first, with
  the p50/p95/p99 latency of those steps;
- peak RSS while generating (the counter is reset after loading; Linux), and at load; the
  process before loading (interpreter, runtime package), and the tokenizer alone (its own
  fresh process), so that what the model itself takes can be told from what any app pays.
Runs alternate over the systems `repeat` times and medians are reported, so the machine's drift
hits every system alike. `compare` also runs the peers (llama.cpp, ONNX Runtime GenAI, OpenVINO
GenAI, transformers) from the directory `tools/peers/setup_peers.sh` prepared (`peers`): its
virtual environment and its bench scripts; the table gives ratios against the best peer and
names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infopt.errors import InfoptError, InvalidArgumentError

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
PREFILL, DECODE, TTFT_TOKENS = 512, 128, 32
DEFAULT_PEERS = Path("/tmp/infopt-peers")


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def tokenizer_rss(bundle: str) -> int:
    """Resident bytes the bundle's tokenizer keeps, loaded alone in a fresh process: measured
    after glibc's malloc_trim, since much of what loading touches is the JSON parser's freed
    memory, which a process loading a model reuses."""
    script = (
        "import ctypes, re, sys\n"
        "from pathlib import Path\n"
        "import tokenizers\n"
        "from infopt.bundle import open_bundle\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "trim = getattr(ctypes.CDLL(None), 'malloc_trim', lambda pad: 0)\n"
        "bundle = open_bundle(sys.argv[1])\n"
        "trim(0)\n"
        "before = rss()\n"
        "tok = bundle.tokenizer\n"
        "trim(0)\n"
        "print(1024 * (rss() - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, bundle], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 else 0


def measure(
    bundle: str, runtime: str | None, threads: int, numerics: str = "fast"
) -> dict[str, Any]:
    """One fresh-process measurement of a bundle (called in the child)."""
    import numpy as np

    import infopt
    from infopt.bundle import open_bundle
    from infopt.core.defaults import DEFAULT_MAX_CONTEXT
    from infopt.decode.generate import stream_generate
    from infopt.decode.sampling import SamplingParams
    from infopt.runtimes.registry import target

    opened = open_bundle(bundle)
    manifest = opened.manifest
    name = runtime or opened.default_runtime
    tokenizer = tokenizer_rss(bundle)
    target(name).module("runtime")  # its package imported: what a process needs before a model
    baseline = _status_kb("VmRSS") * 1024
    # a model file's cached conversion holds its whole trained context; measure it with the
    # context `infopt.load` of the file gives it
    context = None if manifest.get("plan") else min(opened.max_context, DEFAULT_MAX_CONTEXT)
    model = infopt.load(
        bundle, runtime=runtime, threads=threads, numerics=numerics, max_context=context
    )
    load_peak = _status_kb("VmHWM") * 1024
    files = set(manifest["artifacts"][name]["files"])
    weights = sum(f["size"] for f in manifest["files"] if f["path"] in files)
    cfg = manifest["model"]["config"]
    kv = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 4
    kv_bytes = kv * model.runtime.max_context
    # a base model without a chat template reads the request as plain text
    prompt = PROMPT if model.tokenizer.chat_template else PROMPT[0]["content"]
    ids = model.encode_prompt(prompt)
    long = (ids * 40)[:PREFILL]
    short = (ids * 4)[:TTFT_TOKENS]
    params = SamplingParams()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: measure generation alone
        f.write("5")
    model.generate(prompt, max_new_tokens=8, stop_token_ids=[])  # warm-up
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


def run_child(
    bundle: str, runtime: str | None, threads: int, numerics: str = "fast"
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "infopt.measure.speed", bundle, str(threads), numerics]
    cmd += [runtime] if runtime else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise InfoptError(
            f"{bundle} ({runtime or 'its runtime'}): the measurement failed: {reason}"
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


LLAMA_CPP = "llama.cpp Q4_1"
PEER_SCRIPTS = {  # peer -> (its bench script, its model under the peers dir or None)
    LLAMA_CPP: ("llamacpp_bench.py", None),
    "ONNX Runtime GenAI int4": ("ortgenai_bench.py", "ortgenai-int4"),
    "OpenVINO GenAI int4": ("ovgenai_bench.py", "ov-int4"),
    "transformers fp32": ("hf_bench.py", None),
}


# Peers whose bench script crashed in this process with their defaults, run since without them
# (llama.cpp only, for now): every later round measures the same way as the first fallback.
FELL_BACK: set[str] = set()
# llama.cpp repacks weights into its "extra buffer types" (AMX tiles on CPUs that have AMX), and
# with them on it crashed (segmentation fault) on such a machine: a crash is run again with
# them off, on llama.cpp's plain kernels. The script says when it turned them off
# (`extra_bufts=off`) and the row is named for it.
FALLBACK_ENV = {"llama.cpp Q4_1": {"LLAMA_NO_EXTRA_BUFTS": "1"}}


def run_peer(
    name: str, peers: Path, threads: int, model: str | None = None
) -> dict[str, Any] | None:
    """One round of the peer `name`; with `model` (another GGUF file than the default model's),
    llama.cpp on that file, the row named for it."""
    script, arg = PEER_SCRIPTS[name]
    args = [model] if model else [str(peers / arg)] if arg else []
    fallback = FALLBACK_ENV.get(name)
    env = fallback if name in FELL_BACK else None
    out = peer_process(script, args, peers, threads, env)
    if out is not None and out.returncode < 0 and fallback and env is None:
        FELL_BACK.add(name)
        out = peer_process(script, args, peers, threads, fallback)
    result = peer_figures(out)
    if result is None:
        return None
    if model:
        name = f"llama.cpp {Path(model).name}"
    if result.pop("extra_bufts_off", False):
        name = f"{name} (repacking off)"
    return {"runtime": name, **result}


def peer_process(
    script: str, args: list[str], peers: Path, threads: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str] | None:
    """One run of a peer's bench script in the peers' environment (None where the peers are
    not set up)."""
    path = peers / "bench" / script
    python = peers / "venv" / "bin" / "python"
    if not path.exists() or not python.exists():
        return None
    env = {**os.environ, "THREADS": str(threads), "OMP_NUM_THREADS": str(threads), **(env or {})}
    return subprocess.run(
        [str(python), str(path), *args], capture_output=True, text=True, timeout=900, env=env
    )


def peer_figures(out: subprocess.CompletedProcess[str] | None) -> dict[str, Any] | None:
    """The figures a peer's bench script printed (pp512, tg128, ttft_ms: those it has); None
    where it failed or printed none."""
    if out is None or out.returncode != 0 or not out.stdout.strip():
        return None
    line = out.stdout.strip().splitlines()[0]
    found = {k: float(v) for k, v in re.findall(r"(pp512|tg128|ttft)=([\d.]+)", line)}
    if not found:
        return None
    result: dict[str, Any] = {k: found[k] for k in ("pp512", "tg128") if k in found}
    if "ttft" in found:
        result["ttft_ms"] = found["ttft"]
    if "extra_bufts=off" in line:
        result["extra_bufts_off"] = True
    return result


def run_peer_script(
    script: str, args: list[str], peers: Path, threads: int, env: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The figures one of the peers' bench scripts prints (pp512, tg128, ttft_ms: those it
    has), run in the peers' environment; None where the peers are not set up or it failed."""
    return peer_figures(peer_process(script, args, peers, threads, env))


def systems(
    bundles: list[tuple[str, str]],
    runtime: str | None,
    compare: bool,
    numerics: Sequence[str] = ("fast",),
    peer_model: str | None = None,
) -> list[tuple[str, str | None, str | None, str]]:
    """(label, bundle or None for a peer, runtime or peer name, numerics) of everything to
    measure: every artifact of a bundle that can run here, or only its fixed-window (mobile)
    ones where it has any (its other artifacts are there as their reference), in each of
    `numerics` the artifact has (Core ML and a quantized LiteRT model have no exact mode)."""
    from infopt.bundle import open_bundle
    from infopt.runtimes.registry import target, targets

    out: list[tuple[str, str | None, str | None, str]] = []
    for label, bundle in bundles:
        opened = open_bundle(bundle)
        carried = opened.runtimes
        if runtime:  # refused here, as a load refuses it, not inside each measuring process
            target(runtime)  # an unknown name: the known ones listed
            opened.runnable_artifact(runtime)
        if opened.max_context < PREFILL:
            raise InvalidArgumentError(
                f"{bundle}: a context of {opened.max_context} tokens; the measurement prefills "
                f"{PREFILL}: build the bundle with --context {PREFILL} or more"
            )
        found = [n for n, t in targets().items() if n in carried and t.runs_here()]
        mobile = [n for n in found if targets()[n].fixed_windows]
        for rt in [runtime] if runtime else mobile or found:
            for mode in numerics:
                has = targets()[rt].exact_numerics
                no_exact = has == "none" or (has == "float" and opened.artifact(rt).quantized)
                if mode == "exact" and no_exact:
                    continue
                shown = "" if list(numerics) == ["fast"] else f" ({mode})"
                out.append((f"infopt {rt} {label}{shown}", bundle, rt, mode))
    if compare and peer_model:  # the other peers run their own copies of the default model
        out.append((f"llama.cpp {Path(peer_model).name}", None, LLAMA_CPP, "fast"))
    elif compare:
        out += [(name, None, name, "fast") for name in PEER_SCRIPTS]
    return out


def bench(
    bundles: Sequence[str | Path | tuple[str, str | Path]],
    *,
    runtime: str | None = None,
    threads: int = 2,
    repeat: int = 3,
    compare: bool = False,
    peers: str | Path = DEFAULT_PEERS,
    log: Callable[[str], object] | None = None,
    numerics: Sequence[str] = ("fast",),
    peer_model: str | None = None,
) -> list[dict[str, Any]]:
    """Median figures per system (see the module's doc) over `repeat` alternating rounds, for
    bundle paths (labelled by their names) or (label, path) pairs; `compare` adds the peers
    prepared in `peers` (with `peer_model`, a GGUF file other than the default model: llama.cpp
    on that file, the one peer that reads it as it is); `log` gets each measurement as it
    comes; `numerics`: the modes each artifact is measured in (`infopt.load`'s)."""
    for name, value in (("repeat", repeat), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name}={value!r}: must be a whole number, at least 1")
    pairs = [
        (str(b[0]), str(b[1])) if isinstance(b, tuple) else (Path(b).name, str(b)) for b in bundles
    ]
    peers = Path(peers)
    todo = systems(pairs, runtime, compare, numerics, peer_model)
    if compare and not all(
        p.exists() for p in (peers / "venv" / "bin" / "python", peers / "bench")
    ):
        raise InvalidArgumentError(
            f"--compare needs the peers in {peers} (--peers): run "
            f"`bash tools/peers/setup_peers.sh {peers}` from an infopt checkout first"
        )
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _, _ in todo}
    for _ in range(repeat):
        for label, bundle, rt, mode in todo:
            r = (
                run_peer(str(rt), peers, threads, peer_model)
                if bundle is None
                else run_child(bundle, rt, threads, mode)
            )
            if r is None:
                continue
            runs[label].append(r)
            if log:
                log(f"{r['runtime'] if bundle is None else label}: {one_line(r)}")
    rows = []
    for label, results in runs.items():
        if not results:
            continue
        peer = not label.startswith("infopt ")
        # a peer's run may name how it ran (run_peer: llama.cpp with its repacking off)
        system = str(results[-1].get("runtime", label)) if peer else label
        row: dict[str, Any] = {"system": system, "peer": peer}
        for key in results[0]:
            values = [r[key] for r in results if isinstance(r.get(key), int | float)]
            row[key] = statistics.median(values) if values else results[0][key]
        rows.append(row)
    return rows


def one_line(r: dict[str, Any]) -> str:
    """One measurement, as a progress line says it."""
    parts = [
        f"TTFT {r['ttft_ms']:.1f} ms" if "ttft_ms" in r else "",
        f"pp512 {r['pp512']:.0f} tok/s" if "pp512" in r else "",
        f"tg128 {r['tg128']:.1f} tok/s" if "tg128" in r else "",
        f"peak RSS {r['peak_rss'] / 1e6:.0f} MB" if "peak_rss" in r else "",
    ]
    return ", ".join(p for p in parts if p)


def table(rows: list[dict[str, Any]], threads: int, markdown: bool, repeat: int) -> str:
    """The benchmark table as Markdown (or, not markdown, tab-separated), under a line naming
    the machine."""
    return render_table(*table_cells(rows, threads, repeat), markdown)


def render_table(head: str, cols: list[str], cells: list[list[str]], markdown: bool) -> str:
    """`head` (a line naming the machine), then the table as Markdown or tab-separated."""
    if not markdown:
        return "\n".join([head, "", "\t".join(cols), *("\t".join(c) for c in cells)])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def bench_parser(doc: str | None, repeat: int) -> argparse.ArgumentParser:
    """The command line of a benchmark tool (its module docstring as help): `--repeat`,
    `--threads`, and `--json` or `--markdown`; `parse_bench_args` checks them."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    ap.add_argument("--repeat", type=int, default=repeat, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=2)
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--markdown", action="store_true")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: at least 1")
    return args


def log_stderr(line: str) -> None:
    """Progress of a benchmark tool, one line per measurement (stdout keeps the table)."""
    print(line, file=sys.stderr, flush=True)


def table_cells(
    rows: list[dict[str, Any]], threads: int, repeat: int
) -> tuple[str, list[str], list[list[str]]]:
    """(the line naming the machine and how the figures were taken, the columns, the cells) of
    the benchmark table of `repeat` rounds."""
    peers = [r for r in rows if r["peer"]]
    best_tg = max((r["tg128"] for r in peers if "tg128" in r), default=None)
    best_pp = max((r["pp512"] for r in peers if "pp512" in r), default=None)
    runs = f"medians of {repeat} alternating rounds" if repeat > 1 else "one round"
    head = f"{machine()}; {threads} threads, {runs}"
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
    cells: list[list[str]] = []

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
        row = [
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
        cells.append(row)
    return head, cols, cells


def machine() -> str:
    """The CPU, its core count and the flags that pick the runtimes' kernels."""
    from infopt.device_profiles.host import cpu_info

    name, flags, _ = cpu_info()
    return f"{name}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none of note'}"


def main(argv: list[str] | None = None) -> None:
    """The child process of one measurement: `python -m infopt.measure.speed BUNDLE THREADS
    NUMERICS [RUNTIME]` prints its figures as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    bundle, threads, numerics = args[0], int(args[1]), args[2]
    runtime = args[3] if len(args) > 3 else None
    print(json.dumps(measure(bundle, runtime, threads, numerics)))


if __name__ == "__main__":
    main()
