"""Speculative decoding benchmark: targets alone against the same targets with a draft, in one
session, beside the peers' plain decode.

    python -m infopt.tools.spec_bench [--dir /tmp/spec-bench] [--threads 2] [--repeat 2]
        [--compare] [--peers /tmp/infopt-peers] [--json | --markdown]

Builds (once, under --dir) bundles of the default model with ONNX Runtime and OpenVINO
artifacts: fp32 and INT8 targets, each with its INT4 self-draft (`--speculative self`), and the
all-INT4 target of the runtime table (prompt lookup needs no draft). Each configuration runs in
a fresh process: load the bundle (and its draft), then for every prompt of its set alternate a
plain greedy generation (`speculative=False`) and a speculative one, 128 new tokens each,
`--repeat` times. Decode speed is `Stats.decode_tokens_per_s` (tokens after the first over the
time after the first: the draft's own prefill, the probes and the verify passes included);
tokens/s per configuration are summed tokens over summed time. "identical" says whether every
speculative output equalled the plain one token for token. Open prompts (chat) go to the
self-draft, input-grounded prompts (summarize, rewrite, edit code) to prompt lookup.
`--compare` runs the peers' plain decode (ONNX Runtime GenAI, llama.cpp) in the same session
via `infopt.tools.runtime_bench`. `--diagnose` prints, per bundle and runtime, what bounds the
gain: target and draft step times, the draft's agreement with the target's own greedy text,
the cost of a rewind, and how far a several-token pass's logits are from one-token steps'.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

NEW_TOKENS = 128
TEXT = (
    "Solar panels turn sunlight into electricity using cells made of silicon. When light hits "
    "a cell, it frees electrons, and the flow of those electrons is an electric current. Most "
    "home systems connect to the grid through an inverter, which changes the panels' direct "
    "current into the alternating current that houses use. Panels work best facing the sun "
    "without shade, and they lose a little efficiency each year, usually less than one percent."
)
CODE = (
    "def average(values):\n    total = 0\n    for v in values:\n        total = total + v\n"
    "    return total / len(values)\n"
)
OPEN = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a CPU cache works and why it matters for performance.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
]
MISSPELT = (  # TEXT with three typos, for the proofreading prompt
    TEXT.replace("electricity", "electrcity")
    .replace("efficiency", "eficiency")
    .replace("usually", "usualy")
)
GROUNDED = [  # summarize, rewrite, edit code, proofread, extract: from paraphrase to copying
    f"Summarize this text in three sentences:\n{TEXT}",
    f"Rewrite this text in simpler words, keeping every fact:\n{TEXT}",
    f"Add a docstring and type hints to this function, and return the whole function:\n{CODE}",
    f"Fix the spelling mistakes in this text and return the whole corrected text:\n{MISSPELT}",
    f"Copy the sentences of this text that mention the inverter or the grid:\n{TEXT}",
]
BUNDLES = {  # name -> (weights of every tensor group, speculative)
    "fp32+self": ({g: "fp32" for g in ("embeddings", "lm_head", "attention", "mlp")}, "self"),
    "int8+self": ({g: "int8" for g in ("embeddings", "lm_head", "attention", "mlp")}, "self"),
    "int4-all": ({g: "int4-g32" for g in ("embeddings", "lm_head", "attention", "mlp")}, "none"),
}
CONFIGS = [  # (bundle, runtime, drafter, prompts)
    ("fp32+self", "onnxruntime", "self-draft", "open"),
    ("fp32+self", "openvino", "self-draft", "open"),
    ("fp32+self", "onnxruntime", "ngram", "grounded"),
    ("fp32+self", "openvino", "ngram", "grounded"),
    ("int8+self", "onnxruntime", "self-draft", "open"),
    ("int8+self", "openvino", "self-draft", "open"),
    ("int8+self", "onnxruntime", "ngram", "grounded"),
    ("int4-all", "onnxruntime", "ngram", "grounded"),
    ("int4-all", "openvino", "ngram", "grounded"),
    ("int4-all", "onnxruntime", "none", "open"),
]


def measure(
    bundle: str, runtime: str, drafter: str, prompts: str, threads: int, repeat: int
) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import infopt

    m = infopt.load(bundle, runtime=runtime, threads=threads)
    speculative: Any = {"self-draft": None, "ngram": "ngram", "none": False}[drafter]
    texts = OPEN if prompts == "open" else GROUNDED
    m.generate(texts[0], max_new_tokens=8, speculative=False)  # warm-up
    plain_t = spec_t = 0.0
    plain_n = spec_n = drafted = accepted = 0
    identical = True
    per_prompt = [[0.0, 0.0] for _ in texts]  # summed plain and speculative seconds per token
    for _ in range(repeat):
        for i, text in enumerate(texts):
            msgs = [{"role": "user", "content": text}]
            a = m.generate(msgs, max_new_tokens=NEW_TOKENS, speculative=False)
            b = m.generate(msgs, max_new_tokens=NEW_TOKENS, speculative=speculative)
            for r, is_spec in ((a, False), (b, True)):
                n, t = r.stats.generated_tokens - 1, r.stats.total_s - r.stats.ttft_s
                if is_spec:
                    spec_n, spec_t = spec_n + n, spec_t + t
                else:
                    plain_n, plain_t = plain_n + n, plain_t + t
                per_prompt[i][is_spec] += t / max(n, 1) / repeat
            identical &= a.token_ids == b.token_ids
            if b.stats.speculative:
                drafted += b.stats.speculative.drafted
                accepted += b.stats.speculative.accepted
    plain, spec = plain_n / plain_t, spec_n / spec_t
    return {
        "plain_tok_s": round(plain, 1),
        "spec_tok_s": round(spec, 1),
        "speedup": round(spec / plain, 2),
        "per_prompt": [round(p / q, 2) if q else None for p, q in per_prompt],
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "drafted": drafted,
        "identical": identical,
    }


def diagnose(bundle: str, runtime: str, threads: int) -> dict[str, Any]:
    """What bounds speculation on one bundle: per-token times of target and draft, the draft's
    agreement with the target on the target's own greedy text, the cost of a rewind, and how far
    a several-token pass's logits are from one-token steps'."""
    import time

    import numpy as np

    import infopt

    m = infopt.load(bundle, runtime=runtime, threads=threads)
    t = m.runtime
    msgs = [{"role": "user", "content": OPEN[0]}]
    prompt = m.encode_prompt(msgs)
    text = m.generate(msgs, max_new_tokens=NEW_TOKENS, speculative=False).token_ids

    def step_ms(rt: Any, rewind: bool) -> float:
        rt.reset()
        rt.forward(prompt, only_last=True)
        times = []
        for tok in text[:40]:
            start = time.perf_counter()
            rt.forward([tok])
            if rewind:
                rt.rewind(1)
                rt.forward([tok])
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)

    out: dict[str, Any] = {"target_ms": round(step_ms(t, False), 1)}
    out["rewind_ms"] = round(step_ms(t, True) - 2 * out["target_ms"], 1)
    t.reset()
    t.forward(prompt, only_last=True)
    single = np.stack([t.forward([tok])[0] for tok in text[:8]])
    t.reset()
    t.forward(prompt, only_last=True)
    out["batch_vs_single_max_logit_diff"] = float(np.abs(t.forward(text[:8]) - single).max())
    drafter = getattr(m.drafter, "runtime", None)
    if drafter is not None:
        out["draft_ms"] = round(step_ms(drafter, False), 1)
        out["draft_cost"] = round(out["draft_ms"] / out["target_ms"], 2)
        seq = prompt + text
        t.reset()
        drafter.reset()
        a, b = t.forward(seq)[len(prompt) - 1 : -1], drafter.forward(seq)[len(prompt) - 1 : -1]
        out["draft_agreement"] = round(float((a.argmax(-1) == b.argmax(-1)).mean()), 3)
    return out


def build_bundles(folder: Path) -> dict[str, str]:
    from infopt.tools.runtime_bench import build_edited

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (weights, speculative) in BUNDLES.items():
        bundle = folder / name.replace("+", "-")
        build_edited(bundle, name, weights, "onnxruntime,openvino", speculative=speculative)
        out[name] = str(bundle)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default="/tmp/spec-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--peers", default="/tmp/infopt-peers")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("BUNDLE", "RUNTIME", "DRAFTER", "PROMPTS"))
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="Instead: per bundle and runtime, target/draft step times, draft agreement, "
        "rewind cost, several-token vs one-token logits",
    )
    args = ap.parse_args()
    if args.diagnose:
        for name, path in build_bundles(Path(args.dir)).items():
            for runtime in ("onnxruntime", "openvino"):
                row = {"bundle": name, "runtime": runtime}
                row.update(diagnose(path, runtime, args.threads))
                print(json.dumps(row), flush=True)
        return
    if args.child:
        bundle, runtime, drafter, prompts = args.child
        print(json.dumps(measure(bundle, runtime, drafter, prompts, args.threads, args.repeat)))
        return
    bundles = build_bundles(Path(args.dir))
    rows = []
    for name, runtime, drafter, prompts in CONFIGS:
        cmd = [
            sys.executable,
            "-m",
            "infopt.tools.spec_bench",
            "--child",
            bundles[name],
            runtime,
            drafter,
            prompts,
            "--threads",
            str(args.threads),
            "--repeat",
            str(args.repeat),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        row = {
            "target": name.split("+")[0],
            "runtime": runtime,
            "drafter": drafter,
            "prompts": prompts,
            **json.loads(out.stdout.strip().splitlines()[-1]),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    peers = []
    if args.compare:
        from infopt.tools.runtime_bench import run_peer

        for peer in ("ONNX Runtime GenAI int4", "llama.cpp Q4_1"):
            result = run_peer(peer, Path(args.peers), args.threads)
            if result:
                peers.append(result)
    if args.json:
        print(json.dumps({"rows": rows, "peers": peers}, indent=2))
        return
    print(table(rows, peers, args.threads, args.markdown))


def table(
    rows: list[dict[str, Any]], peers: list[dict[str, Any]], threads: int, markdown: bool
) -> str:
    best = max((p["tg128"] for p in peers if "tg128" in p), default=None)
    head = [
        "target",
        "runtime",
        "draft",
        "prompts",
        "alone tok/s",
        "with draft tok/s",
        "speedup",
        "per prompt",
        "acceptance",
        "identical",
        "vs best peer",
    ]
    lines = [f"{platform.machine()}, {threads} threads, {NEW_TOKENS} new tokens per prompt"]
    body = []
    for r in rows:
        vs = f"{r['spec_tok_s'] / best:.2f}x" if best else ""
        body.append(
            [
                r["target"],
                r["runtime"],
                r["drafter"],
                r["prompts"],
                f"{r['plain_tok_s']:.1f}",
                f"{r['spec_tok_s']:.1f}",
                f"{r['speedup']:.2f}x",
                " / ".join(f"{x:.2f}" for x in r.get("per_prompt") or [] if x is not None),
                "" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                "yes" if r["identical"] else "NO",
                vs,
            ]
        )
    for p in peers:
        body.append(
            [
                p["runtime"],
                "",
                "",
                "its chat prompt",
                f"{p.get('tg128', 0):.1f}",
                "",
                "",
                "",
                "",
                "",
                f"{p.get('tg128', 0) / best:.2f}x" if best else "",
            ]
        )
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        lines += ["  ".join(f"{h:>12}" for h in head)]
        lines += ["  ".join(f"{c:>12}" for c in row) for row in body]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
