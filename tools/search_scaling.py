"""How long `infopt-pack search` takes at 7B and 70B, from one measured small-model run and the
planner's cost model, and what a Ray cluster of N nodes does to it.

    infopt-pack search --device host --json > search.json
    python -m infopt.tools.search_scaling search.json CONFIG.json [CONFIG.json ...]
        [--nodes 1,4,16] [--node-memory-gb 512] [--node-cpus 64] [--markdown]

Each candidate's time in the measured run is split by kind (RTN or GPTQ) and scaled to a larger
model as the work grows: loading, round-to-nearest, the held-out forward passes and the speed
measurement with the parameter count; GPTQ's Hessian updates with the parameter count times the
hidden size. A job holds the float model three times (`infopt.plan.search.job_needs`), so a node
runs as many jobs at once as its memory and CPUs allow, and candidates are independent: N nodes
divide the wall time until there are more nodes than candidates. An estimate, not a measurement:
it assumes the small model's per-parameter speed carries over (larger matrices usually run
closer to peak, so it errs long) and ignores moving the model file to each node.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def per_kind(results: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per candidate, by RTN / GPTQ (a cached result keeps the seconds it took
    when it was computed, with the same settings: threads are part of its key)."""
    kinds: dict[str, list[float]] = {"rtn": [], "gptq": []}
    for r in results:
        kinds[r["candidate"]["method"]].append(r["seconds"])
    return {k: statistics.median(v) for k, v in kinds.items() if v}


def main(argv: list[str] | None = None) -> int:
    from infopt.importers import load_spec
    from infopt.plan.search import job_needs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("search_json", help="`infopt-pack search --json` output of a measured run")
    ap.add_argument("configs", nargs="+", help="config.json files of the larger models")
    ap.add_argument("--nodes", default="1,4,16")
    ap.add_argument("--node-memory-gb", type=float, default=512.0)
    ap.add_argument("--node-cpus", type=int, default=64)
    ap.add_argument("--threads", type=int, default=8, help="CPUs per job at scale")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    run = json.loads(Path(args.search_json).read_text(encoding="utf-8"))
    base = load_spec(run["model"])
    seconds = per_kind(run["results"])
    if not seconds:
        raise SystemExit("the run has no candidate")
    count = {
        kind: sum(r["candidate"]["method"] == kind for r in run["results"])
        for kind in ("rtn", "gptq")
    }
    nodes = [int(n) for n in args.nodes.split(",")]
    threads_then = run.get("threads", 1)
    header = ["model", "params", "job memory", "jobs per node", "RTN candidate", "GPTQ candidate"]
    header += [f"{n} node{'s' * (n > 1)}" for n in nodes]
    rows = []
    for spec in [base, *(load_spec(c) for c in args.configs)]:
        scale = spec.num_params / base.num_params
        speedup = args.threads / threads_then  # more threads per job at scale, ideally linear
        t = {
            "rtn": seconds.get("rtn", 0.0) * scale / (1 if spec is base else speedup),
            "gptq": seconds.get("gptq", 0.0)
            * scale
            * (spec.hidden_size / base.hidden_size)
            / (1 if spec is base else speedup),
        }
        memory = job_needs(spec).memory
        per_node = max(
            0, min(int(args.node_memory_gb * 1e9 // memory), args.node_cpus // args.threads)
        )
        total = [count["rtn"] * t["rtn"] + count["gptq"] * t["gptq"]]
        walls = []
        for n in nodes:
            slots = n * per_node
            if slots == 0:
                walls.append("does not fit a node")
                continue
            # candidates spread over the slots: no faster than the longest single one
            longest = max(t[k] for k in t if count[k])
            walls.append(_duration(max(total[0] / slots, longest)))
        rows.append(
            [
                spec.architecture + f" {spec.num_layers}L/{spec.hidden_size}",
                f"{spec.num_params / 1e9:.2f} B",
                f"{memory / 1e9:.1f} GB",
                str(per_node),
                _duration(t["rtn"]),
                _duration(t["gptq"]),
                *walls,
            ]
        )
    print(
        f"{count['rtn']} RTN + {count['gptq']} GPTQ candidates; measured on "
        f"{Path(run['model']).name}: RTN {seconds.get('rtn', 0):.1f} s, GPTQ "
        f"{seconds.get('gptq', 0):.1f} s per candidate ({threads_then} threads); at scale "
        f"{args.threads} threads per job, nodes of {args.node_cpus} CPUs and "
        f"{args.node_memory_gb:g} GB"
    )
    if args.markdown:
        print("\n| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in rows:
            print("  ".join(f"{h}={v}" for h, v in zip(header, r, strict=True)))
    return 0


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


if __name__ == "__main__":
    raise SystemExit(main())
