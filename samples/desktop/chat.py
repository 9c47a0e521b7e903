"""A terminal chat app that embeds infopt: multi-turn, streamed, with the model's chat template.

    python samples/desktop/chat.py [MODEL] [--system TEXT] [--draft ngram|DRAFT]

MODEL is a bundle, a GGUF file or a Hugging Face folder (default: SmolLM2-135M-Instruct).
--draft turns on speculative decoding (a bundle built with --speculative uses its own draft):
"ngram" looks tokens up in the conversation so far, a path names a draft model. Type a message
and press Enter; an empty line, /exit, /quit or Ctrl-D quits (`infopt-pack chat` is the full
command: /reset, /system, history). When the conversation outgrows the context
window, the oldest turns are dropped; a message too long for it alone is refused, and the chat
goes on.
"""

from __future__ import annotations

import argparse
import sys

import infopt


def trim(history: list[dict[str, str]], model: infopt.Model, reserve: int) -> list[dict[str, str]]:
    """Drop the oldest user/assistant turns (keeping a system message) until the prompt fits."""
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system) :]
    while len(turns) > 1 and len(model.encode_prompt(system + turns)) + reserve > (
        model.runtime.max_context
    ):
        turns = turns[2:]
    return system + turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--draft", help="'ngram' or a draft model path (speculative decoding)")
    args = ap.parse_args()

    model = infopt.load(args.model, draft=args.draft)
    history: list[dict[str, str]] = (
        [{"role": "system", "content": args.system}] if args.system else []
    )
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not sys.stdin.isatty():  # a terminal echoes what was typed; a pipe does not
            print(user)
        if not user or user in ("/exit", "/quit"):
            break
        asked = trim([*history, {"role": "user", "content": user}], model, args.max_new_tokens)
        try:
            stream = model.stream(asked, max_new_tokens=args.max_new_tokens)
        except infopt.InfoptError as e:  # a message too long for the context, say: not kept
            print(f"error: {e}", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        assert stream.result is not None
        history = [*asked, {"role": "assistant", "content": stream.result.text}]


if __name__ == "__main__":
    main()
