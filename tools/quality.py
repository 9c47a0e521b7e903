"""Quality table: compressed variants of the default model against its fp32 (dequantized)
reference, on held-out English text.

    python -m infopt.tools.quality [--tokens 3000] [--markdown]

Evaluation text: Python's language reference as shipped with this interpreter
(`pydoc_data.topics`). Calibration for GPTQ: the docstrings of 30 standard-library modules
(another document; read from this interpreter, nothing downloaded), or infopt's own shipped
calibration text for the row that says so. Every variant is quantized, saved as an infopt weight
file (size on disk), scored with sliding windows (perplexity, KL(fp32 || variant), top-1
agreement), and timed decoding 64 greedy tokens on the PyTorch runtime.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

import infopt
from infopt.checkpoint import save_model
from infopt.compress import (
    calibration_batches,
    default_calibration_text,
    prune_mlp_channels,
    quantize_model,
)
from infopt.evaluate import evaluate
from infopt.runtimes.pytorch import TorchRuntime
from infopt.sparsity import low_rank_model, prune_model

STDLIB = [
    "collections",
    "json",
    "os",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "argparse",
    "logging",
    "datetime",
    "random",
    "statistics",
    "itertools",
    "functools",
    "typing",
    "subprocess",
    "shutil",
    "csv",
    "email",
    "http.client",
    "urllib.request",
    "threading",
    "asyncio",
    "decimal",
    "fractions",
    "heapq",
    "bisect",
    "calendar",
    "unittest",
    "doctest",
]
HEAD = {"embeddings": "int8", "lm_head": "int8"}
# (label, quantization by tensor group or None, method, calibration) — method is rtn | gptq for
# quantization, or one of the structural edits below.
VARIANTS: list[tuple[str, dict[str, str] | None, str, str]] = [
    ("fp32 (reference)", None, "rtn", ""),
    ("INT8 RTN", {**HEAD, "attention": "int8", "mlp": "int8"}, "rtn", ""),
    ("INT4 RTN g32", {**HEAD, "attention": "int4-g32", "mlp": "int4-g32"}, "rtn", ""),
    ("INT4 GPTQ g32", {**HEAD, "attention": "int4-g32", "mlp": "int4-g32"}, "gptq", "stdlib"),
    (
        "INT4 GPTQ g32, shipped calibration text",
        {**HEAD, "attention": "int4-g32", "mlp": "int4-g32"},
        "gptq",
        "shipped",
    ),
    ("INT4 RTN g64", {**HEAD, "attention": "int4-g64", "mlp": "int4-g64"}, "rtn", ""),
    ("INT4 GPTQ g64", {**HEAD, "attention": "int4-g64", "mlp": "int4-g64"}, "gptq", "stdlib"),
    ("50% unstructured, Wanda", None, "wanda-0.5", "stdlib"),
    ("2:4 semi-structured, Wanda scores", None, "2:4", "stdlib"),
    ("structured: MLP channels -12.5%", None, "mlp-0.1", "stdlib"),
    ("structured: MLP channels -20.8%", None, "mlp-0.2", "stdlib"),
    ("low-rank 10% (plain SVD)", None, "svd-0.9", ""),
    ("low-rank 10% (whitened SVD)", None, "svd-0.9", "stdlib"),
    ("low-rank 20% (plain SVD)", None, "svd-0.8", ""),
    ("low-rank 20% (whitened SVD)", None, "svd-0.8", "stdlib"),
]


def eval_text() -> str:
    import pydoc_data.topics as topics

    return " ".join(topics.topics[k] for k in sorted(topics.topics))


def stdlib_docstrings() -> str:
    docs: list[str] = []
    for name in STDLIB:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(dict.fromkeys(docs))


def decode_speed(model: infopt.Model) -> float:
    prompt = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    model.generate(prompt, max_new_tokens=4, stop_token_ids=[])
    return model.generate(prompt, max_new_tokens=64, stop_token_ids=[]).stats.decode_tokens_per_s


def run(tokens: int, window: int, cal_windows: int) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    reference = infopt.load(threads=2, max_context=window)
    ids = reference.tokenizer.encode(eval_text())[:tokens]
    calibration = {
        "stdlib": calibration_batches(
            reference.tokenizer.encode(stdlib_docstrings()), 256, cal_windows
        ),
        "shipped": calibration_batches(
            reference.tokenizer.encode(default_calibration_text()), 256, cal_windows
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, weights, method, cal in VARIANTS:
            model = infopt.load(threads=2, max_context=window)
            core = cast(TorchRuntime, model.runtime).model
            start = time.perf_counter()
            cal_ids = calibration.get(cal)
            if weights is not None:
                quantize_model(core, weights, method=method, calibration=cal_ids)
            elif method.startswith("wanda-"):
                prune_model(core, "wanda", float(method[6:]), cal_ids)
            elif method == "2:4":
                prune_model(core, "2:4", calibration=cal_ids)
            elif method.startswith("mlp-"):
                prune_mlp_channels(core, float(method[4:]), cal_ids)
            elif method.startswith("svd-"):
                low_rank_model(core, float(method[4:]), cal_ids)
            core.setup_cache(window)
            seconds = time.perf_counter() - start
            size = save_model(core, Path(tmp) / "w.safetensors")
            q = evaluate(model.runtime, ids, reference.runtime, window=window)
            rows.append(
                {
                    "variant": label,
                    "method": method,
                    "calibration_tokens": calibration[cal].numel() if cal else 0,
                    "compress_s": seconds,
                    "size_bytes": size,
                    **q.to_dict(),
                    "decode_tok_s": decode_speed(model),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]["perplexity"]
    rtn = {r["variant"].split()[-1]: r["perplexity"] for r in rows if "RTN g" in r["variant"]}
    out = [
        f"{rows[0]['tokens']} tokens scored, fp32 perplexity {ref:.3f}\n",
        "| variant | perplexity | Δ vs fp32 | KL (nats/token) | top-1 | size on disk | "
        "decode tok/s | GPTQ gap recovered | compression time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recovered = ""
        if r["method"] == "gptq":
            group = next(g for g in rtn if g in r["variant"])
            recovered = f"{(rtn[group] - r['perplexity']) / (rtn[group] - ref):.0%}"
        cal = (
            f" ({r['calibration_tokens']:,} calibration tokens)" if r["calibration_tokens"] else ""
        )
        out.append(
            f"| {r['variant']}{cal} | {r['perplexity']:.3f} | {r['perplexity'] / ref - 1:+.2%} | "
            f"{r['kl']:.4f} | {r['top1']:.3f} | {r['size_bytes'] / 1e6:.1f} MB | "
            f"{r['decode_tok_s']:.1f} | {recovered} | {r['compress_s']:.0f} s |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3000, help="evaluation tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=64, help="of 256 tokens")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = run(args.tokens, args.window, args.calibration_windows)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
