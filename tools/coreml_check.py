"""Core ML parity check, for a Mac: a bundle's Core ML artifact against its own PyTorch artifact.

    pip install 'infopt[coreml,torch]'
    infopt-pack build --device apple-ane --runtime coreml,pytorch -o smollm2-ane
    python -m infopt.tools.coreml_check smollm2-ane [--device ane|gpu|cpu|auto] [--markdown]

Everywhere: reads the .mlpackage back (inputs, outputs, states, ops, weight dtypes) and checks it
against the manifest. On macOS 15+ also: top-1 agreement and largest logit difference over
held-out text, greedy continuations of four prompts compared token by token (Core ML computes in
fp16, so a late divergence is expected and reported, not hidden), and speculative decoding with
prompt lookup through the fixed verify window giving the Core ML model's own greedy tokens.
Elsewhere it stops after the package check with the reason (Core ML predicts only on macOS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def check_prediction(bundle: Path, device: str | None) -> list[dict[str, Any]]:
    """macOS only: Core ML against the bundle's PyTorch artifact, and speculation on Core ML."""
    import infopt
    from infopt.tools.runtime_check import PROMPTS, compare

    rows = compare(str(bundle), tokens=256, runtimes=["coreml"], device=device)
    model = infopt.load(bundle, runtime="coreml", device=device, draft="ngram")
    same = 0
    for prompt in PROMPTS:
        plain = model.generate(prompt, max_new_tokens=64, stop_token_ids=[], speculative=False)
        spec = model.generate(prompt, max_new_tokens=64, stop_token_ids=[])
        same += plain.token_ids == spec.token_ids
    rows[0]["speculative_identical"] = f"{same}/{len(PROMPTS)}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--device", choices=["auto", "ane", "gpu", "cpu"], default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    from infopt.bundle import verify_bundle
    from infopt.errors import BundleError, UnsupportedPlatformError
    from infopt.runtimes.coreml import require_macos
    from infopt.runtimes.coreml.check import check_package

    try:
        artifact = verify_bundle(args.bundle)["artifacts"]["coreml"]
        print(json.dumps(check_package(args.bundle, artifact), indent=2))
    except (BundleError, KeyError) as e:
        raise SystemExit(f"{args.bundle}: {e!r}") from None
    try:
        require_macos(str(args.bundle))
    except UnsupportedPlatformError as e:
        raise SystemExit(f"package checked; prediction skipped: {e}") from None
    rows = check_prediction(args.bundle, args.device)
    if args.markdown:
        from infopt.tools.runtime_check import markdown

        print(markdown(rows))
    else:
        print(json.dumps(rows, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
