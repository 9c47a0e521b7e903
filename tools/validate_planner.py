"""Planner predictions against reality.

    python -m infopt.tools.validate_planner [--matrix DIR] [--markdown] [--skip-host]

1. This machine: the default model (SmolLM2-135M-Instruct) on every desktop CPU runtime at fp32,
   INT8 and INT4 (runtime_bench's matrix bundles, built once under DIR), and what
   `infopt.load()` runs by default (the GGUF's own blocks on the fastest runtime). Each case runs
   in a fresh process: load, reset the peak-RSS counter, generate 128 greedy tokens; the
   generation's peak RSS and decode speed are compared with the memory and speed models on the
   `host` profile (bandwidth measured here). The implied efficiency is the decode efficiency
   that would have predicted the measured speed: what a runtime's record
   (`Target.cpu_decode_efficiency`) is set from.
2. Published measurements on GPUs and Apple silicon, against the same models on the built-in
   and `tools/validation_profiles/` profiles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from infopt.core.spec import spec_from_hf_config
from infopt.device_profiles import load_profile
from infopt.importers import load_spec
from infopt.plan.costs import Compression, estimate

HERE = Path(__file__).parent
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
NEW_TOKENS = 128
CONTEXT = 1024  # the matrix bundles' KV cache
CASES = ("fp32", "int8", "int4")  # runtime_bench's matrix bundles
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
# (label, device profile, compression, tokens in cache on average, measured tok/s, source)
PUBLISHED: list[tuple[str, str | Path, dict[str, str], str, int, float, str]] = [
    (
        "Llama-2-7B bf16, A100 80GB (calibration point)",
        "a100-80gb",
        {"embeddings": "bf16", "lm_head": "bf16", "attention": "bf16", "mlp": "bf16"},
        "bf16",
        100,
        107.0,
        "pytorch/ao README (torchao/_models/llama benchmarks)",
    ),
    (
        "Llama-2-7B Q4_0, M1 GPU (Metal)",
        HERE / "validation_profiles" / "apple-m1-gpu.toml",
        {
            "embeddings": "int4s-g32",
            "lm_head": "int8",
            "attention": "int4s-g32",
            "mlp": "int4s-g32",
        },
        "fp16",
        64,
        14.15,
        "llama.cpp discussion 4167, tg128",
    ),
    (
        "Llama-2-7B Q4_0, M2 Pro GPU (Metal)",
        HERE / "validation_profiles" / "apple-m2pro-gpu.toml",
        {
            "embeddings": "int4s-g32",
            "lm_head": "int8",
            "attention": "int4s-g32",
            "mlp": "int4s-g32",
        },
        "fp16",
        64,
        37.9,
        "llama.cpp discussion 4167, tg128",
    ),
]

CHILD = """
import json, sys, infopt
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
model, runtime, context = sys.argv[1] or None, sys.argv[2] or None, int(sys.argv[3])
prompt, n = json.loads(sys.argv[4]), int(sys.argv[5])
m = infopt.load(model, threads=2, max_context=context, runtime=runtime)
load_peak = status('VmHWM')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak counter: measure generation
r = m.generate(prompt, max_new_tokens=n, stop_token_ids=[])
print(json.dumps({"peak_rss": status('VmHWM'), "load_peak_rss": load_peak,
                  "runtime": m.runtime.name, "decode_tok_s": r.stats.decode_tokens_per_s,
                  "prompt_tokens": r.stats.prompt_tokens}))
"""


def host_cases(matrix: Path) -> list[dict[str, Any]]:
    from infopt.core.default_model import default_model_path
    from infopt.importers import stored_weights
    from infopt.plan.costs import decode_efficiency
    from infopt.tools.runtime_bench import CPU_RUNTIMES, MATRIX, build_matrix

    bundles = dict(build_matrix(matrix))
    profile = load_profile("host", measure_bandwidth=True)
    spec = load_spec(default_model_path())
    cases = [
        (f"{label} bundle", bundles[label], r, MATRIX[label])
        for label in CASES
        for r in CPU_RUNTIMES
    ]
    file_weights = stored_weights(default_model_path())
    assert file_weights is not None  # the default model is a quantized GGUF
    cases.append(("infopt.load() default (the file's blocks)", "", "", file_weights))
    rows = []
    for label, model, runtime, weights in cases:
        command = [sys.executable, "-c", CHILD, model, runtime, str(CONTEXT), json.dumps(PROMPT)]
        out = subprocess.run(
            [*command, str(NEW_TOKENS)], capture_output=True, text=True, check=True
        )
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        c = Compression(label, weights, kv_dtype="fp32")
        filled = measured["prompt_tokens"] + NEW_TOKENS / 2
        name = measured["runtime"]
        est = estimate(spec, profile, c, context=CONTEXT, runtime=name, decode_context=filled)
        efficiency = decode_efficiency(name, profile, c)
        rows.append(
            {
                "case": label,
                **measured,
                "predicted_memory": est.total,
                "predicted_tok_s": est.decode_tok_s,
                "memory_error": est.total / measured["peak_rss"] - 1,
                "speed_error": est.decode_tok_s / measured["decode_tok_s"] - 1,
                "efficiency": efficiency,
                "implied_efficiency": efficiency * measured["decode_tok_s"] / est.decode_tok_s,
                "bandwidth": profile.bandwidth,
            }
        )
    return rows


def published_cases() -> list[dict[str, Any]]:
    spec = spec_from_hf_config(LLAMA2_7B)
    rows = []
    for label, device, weights, kv, filled, measured, source in PUBLISHED:
        profile = load_profile(device)
        est = estimate(
            spec,
            profile,
            Compression(label, weights, kv_dtype=kv),
            context=4096,
            decode_context=filled,
        )
        rows.append(
            {
                "case": label,
                "device": profile.name,
                "measured_tok_s": measured,
                "predicted_tok_s": est.decode_tok_s,
                "speed_error": est.decode_tok_s / measured - 1,
                "source": source,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--skip-host", action="store_true", help="only the published comparisons")
    ap.add_argument(
        "--matrix", type=Path, default=Path("/tmp/infopt-matrix"), help="runtime_bench's bundles"
    )
    args = ap.parse_args()
    host = [] if args.skip_host else host_cases(args.matrix)
    published = published_cases()
    if not args.markdown:
        print(json.dumps({"host": host, "published": published}, indent=2))
        return
    if host:
        from infopt.device_profiles.host import cpu_info

        name, flags, _ = cpu_info()
        print(
            f"This machine ({name}; {' '.join(flags)}), bandwidth measured "
            f"{host[0]['bandwidth'] / 1e9:.1f} GB/s (copy), {NEW_TOKENS} greedy tokens after a "
            f"{host[0]['prompt_tokens']}-token prompt, KV cache {CONTEXT} tokens:\n"
        )
        print(
            "| case | runtime | predicted memory | peak RSS (generation) | error | peak RSS (load) "
            "| predicted decode | measured decode | error | efficiency used | implied |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in host:
            print(
                f"| {r['case']} | {r['runtime']} | {r['predicted_memory'] / 1e6:.0f} MB | "
                f"{r['peak_rss'] / 1e6:.0f} MB | {r['memory_error']:+.1%} | "
                f"{r['load_peak_rss'] / 1e6:.0f} MB | {r['predicted_tok_s']:.1f} tok/s | "
                f"{r['decode_tok_s']:.1f} tok/s | {r['speed_error']:+.1%} | "
                f"{r['efficiency']:.2f} | {r['implied_efficiency']:.2f} |"
            )
        print()
    print("| published measurement | device profile | measured | predicted | error | source |")
    print("|---|---|---|---|---|---|")
    for r in published:
        print(
            f"| {r['case']} | {r['device']} | {r['measured_tok_s']:.2f} tok/s | "
            f"{r['predicted_tok_s']:.2f} tok/s | {r['speed_error']:+.1%} | {r['source']} |"
        )


if __name__ == "__main__":
    main()
