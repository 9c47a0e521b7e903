"""Runtime agreement: every artifact of a bundle against the bundle's own PyTorch artifact (the
same weights, run by the model core), or a model file as `infopt.load` runs it by default
against the same file on PyTorch (its dequantized weights), on held-out text, position by
position.

    python -m infopt.tools.runtime_check BUNDLE [BUNDLE ...] [--tokens 512] [--markdown]
    python -m infopt.tools.runtime_check --matrix DIR [--tflite] --markdown  # runtime_bench's
    python -m infopt.tools.runtime_check --model [MODEL] --markdown  # the fast default

Reports, per runtime: top-1 agreement of the next-token predictions, the mean KL divergence
KL(reference || runtime) over them, the largest logit difference (absolute, and relative to the
largest logit), and greedy continuations of a few prompts compared token by token. Evaluation
text: Python's language reference, as shipped with this interpreter (the quality table's
held-out text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
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


@dataclass
class Reference:
    """What every row of a bundle is compared with: the bundle's PyTorch artifact computing its
    stored weights exactly (dequantized, float32) on `ids`, and its greedy continuations."""

    model: Any  # an infopt.Model on the exact PyTorch runtime
    served: Any  # the PyTorch runtime as `infopt.load` serves the bundle: packed kernels, or None
    ids: list[int]
    expected: np.ndarray
    greedy: list[Any]
    new_tokens: int
    weights_sha256: str  # of the PyTorch artifact's weights: bundles holding the same share it

    @property
    def measured(self) -> tuple[list[int], np.ndarray, list[Any], int]:
        """`agreement`'s arguments after the model."""
        return self.ids, self.expected, self.greedy, self.new_tokens


def prompts_for(tokenizer: Any) -> list[str | list[dict[str, Any]]]:
    """PROMPTS as a model can take them: a base model without a chat template gets the chats'
    last message as plain text."""
    return [
        p if isinstance(p, str) or tokenizer.chat_template else p[-1]["content"] for p in PROMPTS
    ]


def reference(bundle: str, tokens: int = 512, new_tokens: int = NEW_TOKENS) -> Reference:
    """`bundle`'s PyTorch artifact as the reference: its logits on `tokens` tokens of held-out
    text, and `new_tokens` greedy tokens of each of PROMPTS."""
    import infopt
    from infopt.bundle import open_bundle
    from infopt.runtimes.pytorch.runtime import from_bundle

    sha = reference_sha(bundle)  # exits unless the bundle has a PyTorch artifact
    # verifies the bundle; plain decoding (a bundle's draft would speculate in every row)
    model = infopt.load(bundle, runtime="pytorch", threads=2, draft=False)
    served = model.runtime if getattr(model.runtime, "kernels", None) else None
    # the reference computes the stored weights exactly (dequantized, float32), not on the packed
    # bfloat16 kernels the PyTorch runtime serves quantized layers with: those get a row
    artifact = open_bundle(bundle, verify=False).artifact("pytorch")  # verified just now
    model.runtime = from_bundle(
        artifact, max_context=model.runtime.max_context, threads=2, numerics="exact"
    )
    ids = eval_ids(model.tokenizer, tokens)
    expected = model.runtime.forward(ids)
    greedy = [
        model.generate(p, max_new_tokens=new_tokens, stop_token_ids=[])
        for p in prompts_for(model.tokenizer)
    ]
    return Reference(model, served, ids, expected, greedy, new_tokens, sha)


def compare(
    bundle: str,
    tokens: int = 512,
    new_tokens: int = NEW_TOKENS,
    runtimes: list[str] | None = None,
    device: str | None = None,
    numerics: str | tuple[str, ...] = "fast",
    against: Reference | None = None,
) -> list[dict[str, Any]]:
    """One row per non-PyTorch artifact of `bundle` (or per one of `runtimes`, on `device`) and
    per mode of `numerics` it is loaded with; with "fast", a row for the PyTorch runtime's packed
    kernels too. `against`: a reference already computed (`reference()`, whose `tokens` and
    `new_tokens` then apply), of this bundle or of one whose PyTorch artifact holds the very same
    weights (checked). A bundle's draft is not loaded: every row decodes plainly."""
    import infopt
    from infopt.bundle.manifest import read_manifest

    artifacts = read_manifest(bundle)["artifacts"]  # each load below verifies the bundle
    ref = against or reference(bundle, tokens, new_tokens)
    if against is not None and reference_sha(bundle) != against.weights_sha256:
        raise ValueError(f"{bundle}: its PyTorch weights are not the reference's")
    names = runtimes or sorted(a for a in artifacts if a != "pytorch")
    rows = []
    for mode in (numerics,) if isinstance(numerics, str) else numerics:
        for name in names:
            model = infopt.load(
                bundle, runtime=name, threads=2, device=device, numerics=mode, draft=False
            )
            row = agreement(Path(bundle).name, model, *ref.measured)
            rows.append({**row, "numerics": mode})
        if runtimes is None and mode == "fast" and ref.served is not None:
            exact, ref.model.runtime = ref.model.runtime, ref.served  # now on the packed kernels
            ref.served.reset()  # an earlier row's tokens are not this row's context
            try:
                row = agreement(Path(bundle).name, ref.model, *ref.measured)
            finally:
                ref.model.runtime = exact
            rows.append({**row, "runtime": "pytorch (packed bf16 kernels)", "numerics": "fast"})
    return rows


def reference_sha(bundle: str) -> str:
    """The digest `Reference.weights_sha256` of `bundle`'s PyTorch artifact."""
    from infopt.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    if "pytorch" not in manifest["artifacts"]:
        raise SystemExit(f"{bundle}: no pytorch artifact to compare with")
    digests = {e["path"]: e["sha256"] for e in manifest["files"]}
    names = manifest["artifacts"]["pytorch"]["files"]
    return hashlib.sha256("".join(digests[n] for n in names).encode()).hexdigest()


def compare_default(
    model: str | None, tokens: int = 512, new_tokens: int = NEW_TOKENS
) -> list[dict[str, Any]]:
    """A model file as `infopt.load` runs it by default (the fastest runtime here, the file's own
    precision) against the same file on PyTorch (its weights dequantized to float32), and a
    second row with numerics "exact" (fp32 activations: on ONNX Runtime, `MatMulNBits` at
    accuracy level 0), which separates the weights' mapping from the kernels' rounding."""
    import infopt
    from infopt.core.default_model import default_model_path

    path = model or default_model_path()
    reference = infopt.load(path, runtime="pytorch", threads=2, max_context=1024)
    ids = eval_ids(reference.tokenizer, tokens)
    expected = reference.runtime.forward(ids)
    greedy = [
        reference.generate(p, max_new_tokens=new_tokens, stop_token_ids=[])
        for p in prompts_for(reference.tokenizer)
    ]
    fast = infopt.load(path, threads=2, max_context=1024)
    exact = infopt.load(path, threads=2, max_context=1024, numerics="exact")
    rows = [
        {**agreement(Path(path).name, fast, ids, expected, greedy, new_tokens), "numerics": "fast"},
        {**agreement(Path(path).name, exact, ids, expected, greedy, new_tokens),
         "numerics": "exact"},
    ]  # fmt: skip
    return rows


def agreement(
    label: str,
    model: Any,
    ids: list[int],
    expected: np.ndarray,
    greedy: list[Any],
    new_tokens: int,
) -> dict[str, Any]:
    """One row: `model` against the reference's logits `expected` on `ids` and its greedy
    continuations of PROMPTS."""
    got = model.runtime.forward(ids)
    diff = np.abs(got - expected)
    outputs = [
        model.generate(p, max_new_tokens=new_tokens, stop_token_ids=[])
        for p in prompts_for(model.tokenizer)
    ]
    same = [a.token_ids == b.token_ids for a, b in zip(outputs, greedy, strict=True)]
    prefix = [
        next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
            new_tokens,
        )
        for a, b in zip(outputs, greedy, strict=True)
    ]
    ref_logp, logp = _log_softmax(expected), _log_softmax(got)
    kl = float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean())
    return {
        "bundle": label,
        "runtime": model.runtime.name,
        "positions": len(ids),
        "top1": float((got.argmax(-1) == expected.argmax(-1)).mean()),
        "kl": kl,
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / np.abs(expected).max()),
        "greedy_identical": sum(same),
        "prompts": len(PROMPTS),
        "first_divergence": prefix,
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| bundle | runtime | numerics | top-1 agreement | KL (nats/token) | max abs logit diff | "
        "relative | greedy prompts identical (of 64 tokens) | first differing token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['bundle']} | {r['runtime']} | {r.get('numerics', 'fast')} | "
            f"{r['top1']:.3f} ({r['positions']} positions) | "
            f"{r['kl']:.2e} | {r['max_abs']:.2e} | {r['max_rel']:.1e} | "
            f"{r['greedy_identical']}/{r['prompts']} | "
            f"{', '.join(str(p) for p in r['first_divergence'])} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--matrix", type=Path, help="the bundles runtime_bench --matrix built here")
    ap.add_argument("--tflite", action="store_true", help="with --matrix: LiteRT bundles too")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument(
        "--model", nargs="?", const="", help="a model file's fast default (none: the default model)"
    )
    ap.add_argument(
        "--numerics",
        default="fast",
        help="fast, exact, or fast,exact: how the compared runtimes are loaded",
    )
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.model is not None:
        rows = compare_default(args.model or None, args.tokens)
        print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))
        return
    bundles = list(args.bundles)
    if args.matrix:
        from infopt.tools.runtime_bench import build_matrix

        bundles += [b for _, b in build_matrix(args.matrix, args.tflite)]
    modes = tuple(m for m in args.numerics.split(",") if m)
    rows = [r for b in bundles for r in compare(b, args.tokens, numerics=modes)]
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
