"""A real model file against the oracle nobody here wrote: transformers' own GGUF loading and
greedy `generate()`, token for token, beside infopt on each runtime with exact numerics (float32
activations on the file's dequantized weights, as transformers computes).

    python -m infopt.tools.oracle_check [GGUF] [--runtimes pytorch,onnxruntime,openvino]
        [--tokens 64] [--markdown]

Prompts: `runtime_check`'s four (two chats, two plain; a model without a chat template gets the
chats' text as plain prompts), and for a model with sliding-window layers one more, longer than
the window (from the shipped calibration text), so that the window is exercised. Prints, per
runtime, how many prompts gave the same tokens as transformers and where the first difference
was otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import infopt
from infopt.tools.runtime_check import prompts_for as runtime_prompts


def oracle(path: Path, threads: int) -> Any:
    """transformers' model of the file (its own GGUF reader, dequantizing to float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def prompts_for(source: Any) -> list[Any]:
    """runtime_check's prompts as this model can take them, plus a prompt past its sliding window
    if any."""
    tok, spec = source.tokenizer, source.spec
    out: list[Any] = runtime_prompts(tok)
    if spec.sliding_window and "sliding" in spec.layer_kinds:
        from importlib.resources import files

        text = (files("infopt") / "data" / "calibration.txt").read_text(encoding="utf-8")
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) <= spec.sliding_window + 100:
            raise SystemExit(
                f"the shipped text is too short to pass a {spec.sliding_window}-token window"
            )
        out.append(tok.decode(ids[: spec.sliding_window + 100]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "model", nargs="?", default=None, help="a GGUF file (default: the default model)"
    )
    ap.add_argument("--runtimes", default="pytorch,onnxruntime,openvino")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from infopt.core.default_model import default_model_path
    from infopt.importers import open_model

    path = Path(args.model) if args.model else default_model_path()
    hf = oracle(path, args.threads)
    source = open_model(path)
    tok = source.tokenizer  # the prompt ids both get: infopt's rendering
    prompts = prompts_for(source)
    expected = []
    for prompt in prompts:
        ids = tok.encode(prompt) if isinstance(prompt, str) else tok.encode_chat(prompt)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=args.tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        expected.append((prompt, out[0, len(ids) :].tolist()))
    del hf
    rows = []
    for runtime in args.runtimes.split(","):
        t0 = time.perf_counter()
        model = infopt.load(
            path, runtime=runtime, threads=args.threads, numerics="exact", max_context=2048
        )
        same, first = 0, []
        for prompt, want in expected:
            got = model.generate(
                prompt,
                max_new_tokens=args.tokens,
                temperature=0,
                stop_token_ids=[],
            ).token_ids
            if got == want:
                same += 1
            else:
                pairs = zip(got, want, strict=False)  # equal lengths: no stop token ends either
                first.append(next((i for i, (a, b) in enumerate(pairs) if a != b), len(got)))
        rows.append((runtime, same, first, time.perf_counter() - t0))
    name = path.name
    print(f"{name}: greedy {args.tokens} new tokens, {len(prompts)} prompts, vs transformers")
    if args.markdown:
        print("\n| runtime | prompts identical | first difference at token |")
        print("|---|---|---|")
    for runtime, same, first, _ in rows:
        where = ", ".join(map(str, first)) or "—"
        if args.markdown:
            print(f"| {runtime} | {same}/{len(prompts)} | {where} |")
        else:
            print(f"{runtime}: {same}/{len(prompts)} identical; first differences at {where}")
    return 0 if all(same == len(prompts) for _, same, _, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
