"""Quality table: compressed variants of the default model against its fp32 (dequantized)
reference, on held-out English text.

    python -m infopt.tools.quality [--tokens 3000] [--markdown]

Evaluation text: Python's language reference as shipped with this interpreter
(`pydoc_data.topics`). Calibration for GPTQ: the docstrings of 30 standard-library modules
(another document; read from this interpreter, nothing downloaded), or infopt's own shipped
calibration text for the row that says so. Every variant is quantized, saved as an infopt weight
file (size on disk), scored with sliding windows (perplexity, KL(fp32 || variant), top-1
agreement), and timed decoding 64 greedy tokens on the PyTorch runtime. Rows marked
"+ distillation" then train the compressed model towards the fp32 one
(`infopt.compress.distill`) on the same standard-library docstrings, never on the evaluation
text.

    python -m infopt.tools.quality --only "attention heads" --tokens 300   # a quick look
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

import infopt
from infopt.compress.calibration import calibration_batches, default_calibration_text
from infopt.compress.distill import DistillConfig, train
from infopt.compress.low_rank import low_rank_model
from infopt.compress.prune import prune_attention_heads, prune_mlp_channels, prune_model
from infopt.compress.quantize import quantize_model
from infopt.core.model import Decoder
from infopt.core.weights import save_model
from infopt.measure.quality import score
from infopt.runtimes.pytorch.runtime import PyTorchRuntime

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
INT4 = {"g32": {**HEAD, "attention": "int4-g32", "mlp": "int4-g32"}}
INT4["g64"] = {**HEAD, "attention": "int4-g64", "mlp": "int4-g64"}
HEAL_STEPS = 60  # default distillation steps (4 x 256 tokens each) of the "+ distillation" rows


@dataclass(frozen=True)
class Variant:
    label: str
    method: str  # rtn | gptq (with `weights`), or a structural edit: see `compress`
    weights: dict[str, str] | None = None
    calibration: str = ""  # "" | stdlib | shipped
    heal: bool = False  # distill (from the fp32 model) after compressing


VARIANTS = [
    Variant("fp32 (reference)", "none"),
    Variant("INT8 RTN", "rtn", {**HEAD, "attention": "int8", "mlp": "int8"}),
    Variant("INT4 RTN g32", "rtn", INT4["g32"]),
    Variant("INT4 GPTQ g32", "gptq", INT4["g32"], "stdlib"),
    Variant("INT4 GPTQ g32, shipped calibration text", "gptq", INT4["g32"], "shipped"),
    Variant("INT4 RTN g64", "rtn", INT4["g64"]),
    Variant("INT4 GPTQ g64", "gptq", INT4["g64"], "stdlib"),
    Variant("50% unstructured, Wanda", "wanda-0.5", calibration="stdlib"),
    Variant("2:4 semi-structured, Wanda scores", "2:4", calibration="stdlib"),
    Variant("structured: MLP channels -12.5%", "mlp-0.1", calibration="stdlib"),
    Variant("structured: MLP channels -20.8%", "mlp-0.2", calibration="stdlib"),
    Variant("structured: attention heads 9 -> 6 (2 of 3 per KV group)", "heads-2", None, "stdlib"),
    Variant("low-rank 10% (plain SVD)", "svd-0.9"),
    Variant("low-rank 10% (whitened SVD)", "svd-0.9", calibration="stdlib"),
    Variant("low-rank 20% (plain SVD)", "svd-0.8"),
    Variant("low-rank 20% (whitened SVD)", "svd-0.8", calibration="stdlib"),
    Variant("low-rank 20% (whitened SVD, global ranks)", "svd-global-0.8", None, "stdlib"),
    Variant("low-rank 20% (whitened SVD) + distillation", "svd-0.8", None, "stdlib", heal=True),
    Variant("structured: MLP channels -20.8% + distillation", "mlp-0.2", None, "stdlib", True),
    Variant("structured: attention heads 9 -> 6 + distillation", "heads-2", None, "stdlib", True),
]


def compress(core: Decoder, v: Variant, calibration: torch.Tensor | None) -> None:
    if v.weights is not None:
        quantize_model(core, v.weights, method=v.method, calibration=calibration)
    elif v.method.startswith("wanda-"):
        prune_model(core, "wanda", float(v.method[6:]), calibration)
    elif v.method == "2:4":
        prune_model(core, "2:4", calibration=calibration)
    elif v.method.startswith("mlp-"):
        prune_mlp_channels(core, float(v.method[4:]), calibration)
    elif v.method.startswith("heads-"):
        prune_attention_heads(core, heads_per_group=int(v.method[6:]), calibration=calibration)
    elif v.method.startswith("svd-global-"):
        low_rank_model(core, float(v.method[11:]), calibration, allocation="global")
    elif v.method.startswith("svd-"):
        low_rank_model(core, float(v.method[4:]), calibration)
    else:
        assert v.method == "none", v.method


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


def run(
    tokens: int, window: int, cal_windows: int, only: str | None, heal_steps: int = HEAL_STEPS
) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    reference = infopt.load(threads=2, max_context=window, runtime="pytorch")
    teacher = cast(PyTorchRuntime, reference.runtime).model
    ids = reference.tokenizer.encode(eval_text())[:tokens]
    docstrings = reference.tokenizer.encode(stdlib_docstrings())
    calibration = {
        "stdlib": calibration_batches(docstrings, 256, cal_windows),
        "shipped": calibration_batches(
            reference.tokenizer.encode(default_calibration_text()), 256, cal_windows
        ),
    }
    heal_data = calibration_batches(docstrings, 257, 1_000_000)  # the same document, all of it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            if only and only not in v.label:
                continue
            model = infopt.load(threads=2, max_context=window, runtime="pytorch")
            core = cast(PyTorchRuntime, model.runtime).model
            start = time.perf_counter()
            compress(core, v, calibration.get(v.calibration))
            seconds = time.perf_counter() - start
            heal: dict[str, Any] = {}
            if v.heal:
                report = train(core, teacher, heal_data, DistillConfig(steps=heal_steps))
                heal = {"distill_steps": heal_steps, "distill_tokens": report.tokens}
                heal["distill_s"] = report.seconds
                teacher.setup_cache(window)
            core.setup_cache(window)
            size = save_model(core, Path(tmp) / "w.safetensors")
            q = score(model.runtime, ids, reference.runtime, window=window)
            rows.append(
                {
                    "variant": v.label,
                    "method": v.method,
                    "calibration_tokens": calibration[v.calibration].numel()
                    if v.calibration
                    else 0,
                    "compress_s": seconds,
                    "size_bytes": size,
                    **heal,
                    **q.to_dict(),
                    "decode_tok_s": decode_speed(model),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]["reference_perplexity"]
    rtn = {r["variant"].split()[-1]: r["perplexity"] for r in rows if "RTN g" in r["variant"]}
    out = [
        f"{rows[0]['tokens']} tokens scored, fp32 perplexity {ref:.3f}\n",
        "| variant | perplexity | Δ vs fp32 | KL (nats/token) | top-1 | size on disk | "
        "decode tok/s | GPTQ gap recovered | compression time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recovered = ""
        group = next((g for g in rtn if g in r["variant"]), None)
        if r["method"] == "gptq" and group is not None:
            recovered = f"{(rtn[group] - r['perplexity']) / (rtn[group] - ref):.0%}"
        cal = (
            f" ({r['calibration_tokens']:,} calibration tokens)" if r["calibration_tokens"] else ""
        )
        if r.get("distill_steps"):
            cal += f" ({r['distill_steps']} steps, {r['distill_tokens']:,} tokens)"
        seconds = r["compress_s"] + r.get("distill_s", 0)
        out.append(
            f"| {r['variant']}{cal} | {r['perplexity']:.3f} | {r['perplexity'] / ref - 1:+.2%} | "
            f"{r['kl']:.4f} | {r['top1']:.3f} | {r['size_bytes'] / 1e6:.1f} MB | "
            f"{r['decode_tok_s']:.1f} | {recovered} | {seconds:.0f} s |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3000, help="evaluation tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=64, help="of 256 tokens")
    ap.add_argument("--only", help="run only the variants whose label contains this text")
    ap.add_argument("--heal-steps", type=int, default=HEAL_STEPS, help="distillation steps")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = run(args.tokens, args.window, args.calibration_windows, args.only, args.heal_steps)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
