"""Runtime agreement: every artifact of a bundle against the bundle's own PyTorch artifact (the
same weights, run by the model core), on held-out text, position by position.

    python -m infopt.tools.runtime_check BUNDLE [BUNDLE ...] [--tokens 512] [--markdown]
    python -m infopt.tools.runtime_check --matrix DIR [--tflite] --markdown  # runtime_bench's

Reports, per runtime: top-1 agreement of the next-token predictions, the largest logit
difference (absolute, and relative to the largest logit), and greedy continuations of a few
prompts compared token by token. Evaluation text: Python's language reference, as shipped with
this interpreter (the quality table's held-out text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS: list[str | list[dict[str, Any]]] = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a refrigerator works, step by step."}],
    "The history of the printing press begins",
    "def quicksort(arr):\n",
]
NEW_TOKENS = 64


def eval_ids(tokenizer: Any, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    return list(tokenizer.encode(text)[:n])


def compare(
    bundle: str,
    tokens: int = 512,
    new_tokens: int = NEW_TOKENS,
    runtimes: list[str] | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """One row per non-PyTorch artifact of `bundle` (or per one of `runtimes`, on `device`)."""
    import infopt
    from infopt.bundle import verify_bundle

    artifacts = verify_bundle(bundle)["artifacts"]
    if "pytorch" not in artifacts:
        raise SystemExit(f"{bundle}: no pytorch artifact to compare with")
    reference = infopt.load(bundle, runtime="pytorch", threads=2)
    ids = eval_ids(reference.tokenizer, tokens)
    expected = reference.runtime.forward(ids)
    greedy = [reference.generate(p, max_new_tokens=new_tokens, stop_token_ids=[]) for p in PROMPTS]
    rows = []
    for name in runtimes or sorted(a for a in artifacts if a != "pytorch"):
        model = infopt.load(bundle, runtime=name, threads=2, device=device)
        got = model.runtime.forward(ids)
        diff = np.abs(got - expected)
        outputs = [model.generate(p, max_new_tokens=new_tokens, stop_token_ids=[]) for p in PROMPTS]
        same = [a.token_ids == b.token_ids for a, b in zip(outputs, greedy, strict=True)]
        prefix = [
            next(
                (
                    i
                    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False))
                    if x != y
                ),
                new_tokens,
            )
            for a, b in zip(outputs, greedy, strict=True)
        ]
        rows.append(
            {
                "bundle": Path(bundle).name,
                "runtime": name,
                "positions": len(ids),
                "top1": float((got.argmax(-1) == expected.argmax(-1)).mean()),
                "max_abs": float(diff.max()),
                "max_rel": float(diff.max() / np.abs(expected).max()),
                "greedy_identical": sum(same),
                "prompts": len(PROMPTS),
                "first_divergence": prefix,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| bundle | runtime | top-1 agreement | max abs logit diff | relative | greedy prompts "
        "identical (of 64 tokens) | first differing token |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['bundle']} | {r['runtime']} | {r['top1']:.3f} ({r['positions']} positions) | "
            f"{r['max_abs']:.2e} | {r['max_rel']:.1e} | {r['greedy_identical']}/{r['prompts']} | "
            f"{', '.join(str(p) for p in r['first_divergence'])} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--matrix", type=Path, help="the bundles runtime_bench --matrix built here")
    ap.add_argument("--tflite", action="store_true", help="with --matrix: LiteRT bundles too")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    bundles = list(args.bundles)
    if args.matrix:
        from infopt.tools.runtime_bench import build_matrix

        bundles += [b for _, b in build_matrix(args.matrix, args.tflite)]
    rows = [r for b in bundles for r in compare(b, args.tokens)]
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
