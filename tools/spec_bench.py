"""Speculative decoding benchmark: targets alone against the same targets with a draft, in one
session, beside the peers' plain decode.

    python -m infopt.tools.spec_bench [--dir /tmp/spec-bench] [--threads 2] [--repeat 2]
        [--compare] [--peers /tmp/infopt-peers] [--json | --markdown]

Builds (once, under --dir) bundles of the default model with ONNX Runtime and OpenVINO
artifacts: fp32 (with a PyTorch artifact too) and INT8 targets, each with its INT4 self-draft
(`--speculative self`), and the all-INT4 target of the runtime table (prompt lookup needs no
draft). A draft may run on another runtime than its target (the PyTorch target drafts on ONNX
Runtime, whose INT4 kernels are the fast ones). Each configuration runs in
a fresh process: load the bundle (and its draft), then for every prompt of its set alternate a
plain greedy generation (`speculative=False`) and a speculative one, 128 new tokens each,
`--repeat` times. Decode speed is `Stats.decode_tokens_per_s` (tokens after the first over the
time after the first: the draft's own prefill, the probes and the verify passes included);
tokens/s per configuration are summed tokens over summed time. "identical" says whether every
speculative output equalled the plain one token for token. Open prompts (chat) go to the
self-draft, input-grounded prompts (summarize, rewrite, edit code, proofread, extract) to
prompt lookup.
`--compare` runs the peers' plain decode (ONNX Runtime GenAI, llama.cpp) in the same session
via `infopt.tools.runtime_bench`. `--diagnose` prints, per bundle and runtime, what bounds the
gain: target and draft step times, verify passes' costs, the draft's agreement with the
target's own greedy text, what a fixed draft length would gain with it (and with drafting
free), what a schedule that foresaw every rejection would gain (`oracle_speedup`), the cost
of a rewind, and how far a several-token pass's logits are from one-token steps'.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from collections.abc import Sequence
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
GROUPS = ("embeddings", "lm_head", "attention", "mlp")
BUNDLES = {  # name -> (weights of every tensor group, speculative, runtimes)
    "fp32+self": ({g: "fp32" for g in GROUPS}, "self", "onnxruntime,openvino,pytorch"),
    "int8+self": ({g: "int8" for g in GROUPS}, "self", "onnxruntime,openvino"),
    "int4-all": ({g: "int4-g32" for g in GROUPS}, "none", "onnxruntime,openvino"),
}
# (bundle, runtime, drafter, prompts, the draft's runtime). PyTorch's own INT4 path is a
# reference, far slower (the runtime table), so its target drafts on ONNX Runtime.
CONFIGS = [
    ("fp32+self", "onnxruntime", "self-draft", "open", "onnxruntime"),
    ("fp32+self", "openvino", "self-draft", "open", "openvino"),
    ("fp32+self", "openvino", "self-draft", "open", "onnxruntime"),
    ("fp32+self", "pytorch", "self-draft", "open", "onnxruntime"),
    ("fp32+self", "onnxruntime", "ngram", "grounded", ""),
    ("fp32+self", "openvino", "ngram", "grounded", ""),
    ("fp32+self", "pytorch", "ngram", "grounded", ""),
    ("int8+self", "onnxruntime", "self-draft", "open", "onnxruntime"),
    ("int8+self", "openvino", "self-draft", "open", "openvino"),
    ("int8+self", "onnxruntime", "ngram", "grounded", ""),
    ("int4-all", "onnxruntime", "ngram", "grounded", ""),
    ("int4-all", "openvino", "ngram", "grounded", ""),
    ("int4-all", "onnxruntime", "none", "open", ""),
]
DIAGNOSE = [  # (bundle, runtime, the draft's runtime)
    ("fp32+self", "onnxruntime", "onnxruntime"),
    ("fp32+self", "openvino", "openvino"),
    ("fp32+self", "openvino", "onnxruntime"),
    ("fp32+self", "pytorch", "onnxruntime"),
    ("int8+self", "onnxruntime", "onnxruntime"),
    ("int8+self", "openvino", "openvino"),
    ("int4-all", "onnxruntime", ""),
    ("int4-all", "openvino", ""),
]
VERIFY_MAX = 9  # tokens per verify pass whose cost --diagnose measures (k = 1..8 drafts)


def measure(
    bundle: str,
    runtime: str,
    drafter: str,
    prompts: str,
    threads: int,
    repeat: int,
    draft_runtime: str = "",
) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import infopt

    m = infopt.load(bundle, runtime=runtime, threads=threads, draft_runtime=draft_runtime or None)
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


def draft_runs(target_tokens: Sequence[int], draft_tokens: Sequence[int]) -> list[int]:
    """runs[i]: how many greedy drafts in a row, proposed at position i of the target's own
    text, the target keeps. A draft conditioned on the target's text (what verification leaves
    it) predicts draft_tokens[i] at position i, and keeps predicting the target's tokens for as
    long as they agree."""
    runs = [0] * (len(target_tokens) + 1)
    for i in range(len(target_tokens) - 1, -1, -1):
        runs[i] = runs[i + 1] + 1 if target_tokens[i] == draft_tokens[i] else 0
    return runs[:-1]


def oracle_speedup(runs: Sequence[int], draft_cost: float, verify_cost: Sequence[float]) -> float:
    """The most any draft-length schedule could gain on this text, knowing in advance how many
    drafts each pass keeps: the cheapest way (dynamic programming) to produce its tokens from
    plain steps (cost 1 each) and passes of k drafts (k * draft_cost to draft, verify_cost[k]
    to score k + 1 tokens, yielding the kept drafts plus one), over the cost of plain steps.
    Drafting and the first of a text's tokens are free of overheads here, so it bounds the real
    loop from above."""
    n = len(runs)
    cost = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        best = 1.0 + cost[i + 1]
        for k in range(1, len(verify_cost)):
            step = k * draft_cost + verify_cost[k]
            best = min(best, step + cost[min(i + min(runs[i], k) + 1, n)])
        cost[i] = best
    return n / cost[0] if n else 1.0


def fixed_speedup(
    runs: Sequence[int], draft_cost: float, verify_cost: Sequence[float], k: int
) -> float:
    """What passes of k drafts each would gain on this text (no foresight, no overheads)."""
    i, cost = 0, 0.0
    while i < len(runs):
        cost += k * draft_cost + verify_cost[k]
        i += min(runs[i], k) + 1
    return len(runs) / cost if cost else 1.0


def cost_for(runs: Sequence[int], verify_cost: Sequence[float], gain: float) -> float | None:
    """The dearest draft (its step over the target's) with which some fixed draft length
    still gains `gain` on this text; None if not even a free draft does."""

    def best(c: float) -> float:
        return max(fixed_speedup(runs, c, verify_cost, k) for k in range(1, len(verify_cost)))

    if best(0.0) < gain:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        lo, hi = ((lo + hi) / 2, hi) if best((lo + hi) / 2) >= gain else (lo, (lo + hi) / 2)
    return lo


def weight_bytes_ratio(bundle: str) -> float | None:
    """The draft's weight bytes over the target's (the infopt weight files, else OpenVINO's):
    the least a draft step can cost against a target step where both read all their weights."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    draft = (manifest.get("draft") or {}).get("artifacts") or {}
    for name in ("pytorch", "openvino"):
        if name in draft and name in manifest["artifacts"]:
            mine = sum(sizes[f] for f in draft[name]["files"])
            return mine / sum(sizes[f] for f in manifest["artifacts"][name]["files"])
    return None


def diagnose(bundle: str, runtime: str, threads: int, draft_runtime: str = "") -> dict[str, Any]:
    """What bounds speculation on one bundle: per-token times of target and draft, the cost of
    verify passes of 2..VERIFY_MAX tokens, the draft's agreement with the target on the
    target's own greedy answers to the open prompts and the most a draft-length schedule could
    gain with it (`oracle_speedup`), the cost of a rewind, and how far a several-token pass's
    logits are from one-token steps'."""
    import time

    import numpy as np

    import infopt
    from infopt.decode.drafters import ModelDrafter

    m = infopt.load(bundle, runtime=runtime, threads=threads, draft_runtime=draft_runtime or None)
    t = m.runtime
    answers = []
    for question in OPEN:
        msgs = [{"role": "user", "content": question}]
        prompt = m.encode_prompt(msgs)
        answers.append(
            (prompt, m.generate(msgs, max_new_tokens=NEW_TOKENS, speculative=False).token_ids)
        )
    prompt, text = answers[0]

    def pass_ms(rt: Any, sizes: Sequence[int], rewind: bool = False) -> list[float]:
        """Median ms of a pass of each size, the sizes taken in turn at every position (so
        that a noisy stretch of the machine weighs on all alike)."""
        rt.reset()
        rt.forward(prompt, only_last=True)
        times: list[list[float]] = [[] for _ in sizes]
        for i in range(min(40, len(text) - max(sizes))):  # a short answer: fewer positions
            for j, tokens in enumerate(sizes):
                chunk = text[i : i + tokens]
                start = time.perf_counter()
                rt.forward(chunk)
                if rewind:
                    rt.rewind(1)
                    rt.forward(chunk[-1:])
                times[j].append(time.perf_counter() - start)
                rt.rewind(len(chunk))
            rt.forward(text[i : i + 1])  # one position further each time, as decoding goes
        return [float(np.median(x) * 1000) for x in times]

    passes = pass_ms(t, range(1, VERIFY_MAX + 1))
    step = passes[0]
    out: dict[str, Any] = {"target_ms": round(step, 1)}
    out["rewind_ms"] = round(pass_ms(t, [1], rewind=True)[0] - 2 * step, 1)
    verify = [p / step for p in passes]  # verify[k]: k drafts, k + 1 tokens
    out["verify_cost"] = [round(v, 2) for v in verify[1:]]
    t.reset()
    t.forward(prompt, only_last=True)
    single = np.stack([t.forward([tok])[0] for tok in text[:8]])
    t.reset()
    t.forward(prompt, only_last=True)
    out["batch_vs_single_max_logit_diff"] = float(np.abs(t.forward(text[:8]) - single).max())
    drafter = m.drafter.runtime if isinstance(m.drafter, ModelDrafter) else None
    if drafter is not None:
        out["draft_runtime"] = drafter.name
        out["draft_ms"] = round(pass_ms(drafter, [1])[0], 1)
        c = out["draft_ms"] / out["target_ms"]
        out["draft_cost"] = round(c, 2)
        # in turns, as speculation runs them: does either runtime's pool slow the other?
        drafter.reset()
        drafter.forward(prompt, only_last=True)
        t.reset()
        t.forward(prompt, only_last=True)
        beside: list[tuple[float, float]] = []
        for i in range(30):
            start = time.perf_counter()
            for tok in text[i : i + 3]:
                drafter.forward([tok])
            mid = time.perf_counter()
            t.forward(text[i : i + 2])
            beside.append(((mid - start) / 3, time.perf_counter() - mid))
            drafter.rewind(2)
            t.rewind(1)
        out["draft_ms_in_turns"] = round(float(np.median([d for d, _ in beside]) * 1000), 1)
        out["verify1_ms_alone"] = round(verify[1] * step, 1)
        out["verify1_ms_in_turns"] = round(float(np.median([v for _, v in beside]) * 1000), 1)
        runs: list[int] = []
        agree = []
        for prompt_ids, answer in answers:
            drafter.reset()
            seq = prompt_ids + answer
            guess = drafter.forward(seq)[len(prompt_ids) - 1 : -1].argmax(-1)
            agree += (guess == np.asarray(answer)).tolist()
            runs += draft_runs(answer[1:], guess[1:].tolist())  # the first comes from prefill
        out["draft_agreement"] = round(float(np.mean(agree)), 3)
        out["oracle_speedup"] = round(oracle_speedup(runs, c, verify), 2)
        out["oracle_speedup_free_verify"] = round(oracle_speedup(runs, c, [1.0] * len(verify)), 2)
        ks = range(1, len(verify))
        out["best_fixed_k"] = max((round(fixed_speedup(runs, c, verify, k), 2), k) for k in ks)
        out["best_fixed_k_free_draft"] = max(
            (round(fixed_speedup(runs, 0.0, verify, k), 2), k) for k in ks
        )
        floor = weight_bytes_ratio(bundle)
        if floor is not None:  # a draft as cheap as the bytes it reads
            out["bytes_floor_cost"] = round(floor, 3)
            out["best_fixed_k_at_floor"] = max(
                (round(fixed_speedup(runs, floor, verify, k), 2), k) for k in ks
            )
            out["oracle_speedup_at_floor"] = round(oracle_speedup(runs, floor, verify), 2)
        needed = cost_for(runs, verify, 2.0)
        out["draft_cost_for_2x"] = None if needed is None else round(needed, 3)
    return out


def build_bundles(folder: Path) -> dict[str, str]:
    from infopt.tools.runtime_bench import build_edited

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (weights, speculative, runtimes) in BUNDLES.items():
        bundle = folder / name.replace("+", "-")
        build_edited(bundle, name, weights, runtimes, speculative=speculative)
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
    ap.add_argument(
        "--child", nargs=5, metavar=("BUNDLE", "RUNTIME", "DRAFTER", "PROMPTS", "DRAFT_RUNTIME")
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="Instead: per bundle and runtime, target/draft step times, verify pass costs, "
        "draft agreement and the most any draft length could gain with it, rewind cost, "
        "several-token vs one-token logits",
    )
    args = ap.parse_args()
    if args.diagnose:
        paths = build_bundles(Path(args.dir))
        for name, runtime, draft_runtime in DIAGNOSE:
            row = {"bundle": name, "runtime": runtime}
            row.update(diagnose(paths[name], runtime, args.threads, draft_runtime))
            print(json.dumps(row), flush=True)
        return
    if args.child:
        bundle, runtime, drafter, prompts, draft_runtime = args.child
        draft_runtime = "" if draft_runtime == "-" else draft_runtime
        measured = measure(
            bundle, runtime, drafter, prompts, args.threads, args.repeat, draft_runtime
        )
        print(json.dumps(measured))
        return
    bundles = build_bundles(Path(args.dir))
    rows = []
    for name, runtime, drafter, prompts, draft_runtime in CONFIGS:
        cmd = [
            sys.executable,
            "-m",
            "infopt.tools.spec_bench",
            "--child",
            bundles[name],
            runtime,
            drafter,
            prompts,
            draft_runtime or "-",
            "--threads",
            str(args.threads),
            "--repeat",
            str(args.repeat),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        row = {
            "target": name.split("+")[0],
            "runtime": runtime,
            "drafter": drafter
            if draft_runtime in ("", runtime)
            else f"{drafter} ({draft_runtime})",
            "prompts": prompts,
            **json.loads(out.stdout.strip().splitlines()[-1]),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    peers = []
    if args.compare:
        from infopt.measure.speed import run_peer

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
