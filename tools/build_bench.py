"""Build time: the default model to an INT4 round-to-nearest bundle, beside the peers' builders.

    python -m infopt.tools.build_bench [--repeat 3] [--peers /tmp/infopt-peers] [--markdown]

infopt: `infopt-pack build --plan P -o OUT` as a fresh process (imports included), where P is
the host plan with every block INT4 (group 32, asymmetric) and embeddings/LM head INT8 — the
plan a user gets by editing `infopt-pack plan --json`. Peers, when a peers directory made by
`tools/peers/setup_peers.sh` is given: the ONNX Runtime GenAI model builder (int4, CPU)
and optimum-intel's OpenVINO export (int4, group 64, NNCF), each as a fresh process writing to
a new directory. Medians of `--repeat` runs, interleaved, in one session.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INT4 = {"embeddings": "int8", "lm_head": "int8", "attention": "int4-g32", "mlp": "int4-g32"}


def int4_plan(folder: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "infopt.cli", "plan", "--device", "host", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    plan = json.loads(out.stdout)
    plan["compression"]["weights"] = INT4
    plan["compression"]["name"] = "int4-g32 (edited host plan)"
    path = folder / "plan-int4.json"
    path.write_text(json.dumps(plan, indent=2))
    return path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def commands(work: Path, plan: Path, peers: Path | None) -> dict[str, list[str]]:
    cmds = {
        "infopt-pack build (INT4 RTN g32)": [
            sys.executable,
            "-m",
            "infopt.cli",
            "build",
            "--plan",
            str(plan),
            "-o",
            str(work / "infopt"),
        ]
    }
    if peers is not None:
        py, hf = str(peers / "venv" / "bin" / "python"), str(peers / "smollm2-hf")
        cmds["ONNX Runtime GenAI builder (int4)"] = [
            py,
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            hf,
            "-i",
            hf,
            "-o",
            str(work / "ortgenai"),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(work / "ortgenai-cache"),
        ]
        cmds["optimum-intel OpenVINO export (int4 g64)"] = [
            str(peers / "venv" / "bin" / "optimum-cli"),
            "export",
            "openvino",
            "--model",
            hf,
            "--task",
            "text-generation-with-past",
            "--weight-format",
            "int4",
            "--group-size",
            "64",
            str(work / "ov"),
        ]
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peers", type=Path, help="directory made by setup_peers.sh")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    peers = args.peers if args.peers and (args.peers / "venv").exists() else None
    times: dict[str, list[float]] = {}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = int4_plan(work)
        cmds = commands(work, plan, peers)
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                for leftover in work.iterdir():
                    if leftover != plan:
                        shutil.rmtree(leftover, ignore_errors=True)
                times.setdefault(name, []).append(timed(cmd))
                print(json.dumps({"system": name, "seconds": times[name][-1]}), flush=True)
                if (work / "infopt").exists():  # measured before the next command cleans up
                    files = [f for f in (work / "infopt").rglob("*") if f.is_file()]
                    size = sum(f.stat().st_size for f in files)
    ours = statistics.median(times["infopt-pack build (INT4 RTN g32)"])
    if args.markdown:
        print(f"\nbundle size {size / 1e6:.1f} MB; median of {args.repeat} runs\n")
        print("| system | seconds (median) | runs | infopt time / this |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            runs = ", ".join(f"{t:.1f}" for t in ts)
            print(f"| {name} | {med:.1f} | {runs} | {ours / med:.2f} |")


if __name__ == "__main__":
    main()
