"""Benchmark: infopt's PyTorch runtime beside transformers' generate(), same model, same run.

    python -m infopt.tools.bench [--model M] [--threads 2] [--repeat 3] [--json | --markdown]

Measures, as `tools/peers/hf_bench.py` does: pp512 (prefill of 512 tokens, one forward)
and tg128 (128 greedy tokens after a chat prompt, whole generate() call). Runs alternate
(infopt, transformers, infopt, ...) so machine drift hits both alike; the medians and their
ratio are printed. transformers is optional (`pip install 'infopt[dev]'`); without it only
infopt's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import infopt
from infopt.core.default_model import default_model_path

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
PREFILL, DECODE = 512, 128


def infopt_runner(model: infopt.Model) -> tuple[Callable[[], float], Callable[[], float]]:
    ids = model.encode_prompt(PROMPT)
    long = (ids * 40)[:PREFILL]

    def pp() -> float:
        model.runtime.reset()
        t = time.perf_counter()
        model.runtime.forward(long, only_last=True)
        return PREFILL / (time.perf_counter() - t)

    def tg() -> float:
        t = time.perf_counter()
        r = model.generate(PROMPT, max_new_tokens=DECODE, stop_token_ids=[])
        assert len(r.token_ids) == DECODE
        return DECODE / (time.perf_counter() - t)

    return pp, tg


def transformers_runner(path: Path) -> tuple[Callable[[], float], Callable[[], float]]:
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    encoded: Any = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = encoded["input_ids"]
    long = ids.repeat(1, 40)[:, :PREFILL]

    def pp() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            hf(long)
            return PREFILL / (time.perf_counter() - t)

    def tg() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False)
            return DECODE / (time.perf_counter() - t)

    return pp, tg


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--markdown", action="store_true", help="a table for docs/benchmarks.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_path()
    systems: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {
        "infopt pytorch fp32": infopt_runner(
            infopt.load(path, runtime="pytorch", threads=args.threads)
        )
    }
    if not args.no_transformers:
        try:
            systems["transformers fp32 generate()"] = transformers_runner(path)
        except ImportError as e:
            print(f"(transformers peer skipped: {e})")
    for pp, tg in systems.values():  # warm-up
        pp()
        tg()
    results: dict[str, dict[str, list[float]]] = {n: {"pp512": [], "tg128": []} for n in systems}
    for _ in range(args.repeat):
        for name, (pp, tg) in systems.items():
            results[name]["pp512"].append(pp())
            results[name]["tg128"].append(tg())
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    base = med.get("transformers fp32 generate()")
    report: dict[str, Any] = {
        "machine": f"{cpu_name()}, {args.threads} threads",
        "torch": torch.__version__,
        "model": str(path),
        "repeat": args.repeat,
        "median_tok_per_s": med,
        "runs": results,
        "ratio_vs_transformers": base
        and {n: {k: m[k] / base[k] for k in m} for n, m in med.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        (
            n,
            m["pp512"],
            m["tg128"],
            base and m["pp512"] / base["pp512"],
            base and m["tg128"] / base["tg128"],
        )
        for n, m in med.items()
    ]
    if args.markdown:
        runs = f"median of {args.repeat} alternating runs"
        print(f"{report['machine']}, torch {report['torch']}, {runs}\n")
        print("| system | pp512 tok/s | tg128 tok/s | pp512 ratio | tg128 ratio |")
        print("|---|---|---|---|---|")
        for n, pp_s, tg_s, rpp, rtg in rows:
            ratio = f"{rpp:.2f}× | {rtg:.2f}×" if rpp else "— | —"
            print(f"| {n} | {pp_s:.1f} | {tg_s:.1f} | {ratio} |")
        return
    for n, pp_s, tg_s, rpp, rtg in rows:
        ratio = f"  ({rpp:.2f}× / {rtg:.2f}× transformers)" if rpp else ""
        print(f"{n:<30} pp512 {pp_s:7.1f} tok/s   tg128 {tg_s:6.1f} tok/s{ratio}")


if __name__ == "__main__":
    main()
