"""Runtime benchmark for the docs: bundles on their runtimes, beside the peers, in one session.

    python -m infopt.tools.runtime_bench BUNDLE [BUNDLE ...] [--runtime R] [--threads 2]
        [--repeat 3] [--compare] [--peers /tmp/infopt-peers] [--json | --markdown]
    python -m infopt.tools.runtime_bench --matrix DIR [--tflite] [--compare] --markdown  # docs
    python -m infopt.tools.runtime_bench --default [MODEL] [--compare] --markdown  # load()
    python -m infopt.tools.runtime_bench --default --matrix DIR --compare --markdown  # both

What each figure is: `infopt.measure.speed` (`infopt-pack bench` runs the same code on one
bundle). `--matrix DIR` builds (once) fp32, INT8, INT4 and all-INT4 bundles of the default model,
each with an artifact for every desktop CPU runtime, under DIR and benchmarks every runtime of
each; `--tflite` adds fp32, INT8 and INT4 (symmetric) bundles with a LiteRT artifact.
`--default` measures what `infopt.load(MODEL)` does with a model file (the default model unless
named): the first load in a fresh process with an empty cache (conversion included) and a later
one, each its own process, then benchmarks the bundle it cached. `--peers` is the directory
`tools/peers/setup_peers.sh` prepared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from infopt.measure.speed import DEFAULT_PEERS, bench, table
from infopt.runtimes.registry import targets

CPU_RUNTIMES = tuple(  # the desktop CPU targets, the host's default first
    t.name
    for t in sorted(targets().values(), key=lambda t: t.host_rank or 0)
    if t.host_rank is not None
)
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


def build_edited(
    bundle: Path, label: str, weights: dict[str, str], runtimes: str, **options: Any
) -> None:
    """Build `bundle` (unless it exists) from this machine's host plan (1,024-token context)
    with every tensor group's weights set as `weights` says, no pruning, no low rank."""
    from infopt.bundle import is_bundle
    from infopt.bundle.build import build
    from infopt.core.default_model import default_model_path
    from infopt.device_profiles import load_profile
    from infopt.importers import load_spec, stored_weights
    from infopt.plan.planner import plan

    if is_bundle(bundle):
        return
    path = default_model_path()
    spec, host = load_spec(path), load_profile("host")
    # what `infopt-pack plan -d host --context 1024 --json` prints
    data = json.loads(plan(spec, host, context=1024, file_weights=stored_weights(path)).to_json())
    data["compression"]["weights"] = weights
    data["compression"]["name"] = f"{label} (edited host plan)"
    data["pruning"], data["low_rank_ratio"] = {"kind": "none", "sparsity": 0.0}, None
    plan_file = bundle.parent / f"{bundle.name}.plan.json"
    plan_file.write_text(json.dumps(data))
    build(None, bundle, plan_file=plan_file, runtime=runtimes, **options)


def build_matrix(
    folder: Path, tflite: bool = False, labels: tuple[str, ...] = tuple(MATRIX)
) -> list[tuple[str, str]]:
    """(label, bundle) of the `labels` bundles of MATRIX (default: fp32 / INT8 / INT4 /
    INT4-all), built with the three CPU artifacts (and, with `tflite`, fp32 / INT8 / INT4 bundles
    with a LiteRT artifact and a PyTorch one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for label in labels:
        build_edited(folder / label, label, MATRIX[label], ",".join(CPU_RUNTIMES))
    pairs = [(label, str(folder / label)) for label in labels]
    for label, weights in TFLITE_MATRIX.items() if tflite else ():
        build_edited(folder / label, label.removeprefix("tflite-"), weights, "tflite,pytorch")
        pairs.append((label.removeprefix("tflite-"), str(folder / label)))
    return pairs


LOAD = """
import sys, time
start = time.perf_counter()
import infopt
m = infopt.load(sys.argv[1] or None, threads=2)
print(time.perf_counter() - start, m.runtime.name)
"""


def default_load(model: str, cache: Path, repeat: int) -> tuple[dict[str, Any], str]:
    """(first and later load times of `infopt.load(model)` in fresh processes, the bundle it
    cached): the first with `cache` emptied, so it converts; the later ones hit."""
    import os
    import shutil

    env = {**os.environ, "INFOPT_CACHE": str(cache)}
    times: dict[str, list[float]] = {"first_load_s": [], "later_load_s": []}
    runtime = ""
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        for key in ("first_load_s", "later_load_s"):
            cmd = [sys.executable, "-c", LOAD, model]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            seconds, runtime = out.stdout.split()
            times[key].append(float(seconds))
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    import statistics

    figures = {k: statistics.median(v) for k, v in times.items()}
    return {"runtime": runtime, **figures}, str(entry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--runtime", help="only this runtime (default: every artifact of a bundle)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--matrix", type=Path, help="build and bench fp32/INT8/INT4 bundles here")
    ap.add_argument("--tflite", action="store_true", help="with --matrix: LiteRT bundles too")
    ap.add_argument(
        "--default", nargs="?", const="", help="infopt.load() of a model file (none: the default)"
    )
    ap.add_argument("--compare", action="store_true", help="run the peers too")
    ap.add_argument("--numerics", default="fast", help="fast, exact, or fast,exact: load()'s modes")
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    loads = None
    pairs: list[Any] = [(Path(b).name, b) for b in args.bundles]
    if args.default is not None:
        loads, entry = default_load(args.default, Path("/tmp/infopt-bench-cache"), args.repeat)
        print(json.dumps(loads), file=sys.stderr, flush=True)
        pairs.insert(0, ("load() default", entry))
    if args.matrix:
        pairs += build_matrix(args.matrix, args.tflite)
    rows = bench(
        pairs,
        runtime=args.runtime,
        threads=args.threads,
        repeat=args.repeat,
        compare=args.compare,
        peers=args.peers,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        numerics=[m for m in args.numerics.split(",") if m],
        peer_model=args.default or None,  # a model file of its own: llama.cpp on it
    )
    if args.json:
        print(json.dumps({"rows": rows, "loads": loads} if loads else rows, indent=2))
        return
    print(table(rows, args.threads, args.markdown, args.repeat))
    if loads:
        print(
            f"\ninfopt.load() on {loads['runtime']}: first load (converting) "
            f"{loads['first_load_s']:.1f} s, later loads {loads['later_load_s']:.1f} s "
            "(fresh processes, medians)"
        )


if __name__ == "__main__":
    main()
