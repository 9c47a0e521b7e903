"""What an Android app does with a TFLite bundle, written without infopt: the loop to port to
Kotlin (LiteRT's `Interpreter.runSignature` takes the same names), using only `manifest.json`,
`tokenizer.json` and the interpreter's public signature API.

    pip install 'infopt[tflite-convert]'   # on the build machine: the converter (litert-torch)
    infopt-pack build --device host --runtime tflite -o smollm2-tflite
    pip install ai-edge-litert tokenizers  # all the app itself needs
    python samples/mobile/tflite_app.py smollm2-tflite "The capital of France is" [-n 32]

Everything the loop needs is in the manifest's `artifacts.tflite` section: the signatures
(`prefill`, `verify`, `decode`), each with its fixed window of tokens, their input and output
names, and the KV-cache shape [layers, kv_heads, cache_len, head_dim]. The app keeps the cache:
each call takes it whole and returns only the new entries (`k_new`, `v_new`), which the app
writes at the call's positions. A short call is padded: padded tokens sit after the real ones,
where the causal mask hides them, and their entries are never written. Greedy decoding of a
plain-text prompt; an app renders its chat messages with the manifest's `chat_template` first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from tokenizers import Tokenizer


class TFLiteModel:
    def __init__(self, bundle: Path, threads: int = 2) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        art = manifest["artifacts"]["tflite"]
        self.interpreter = Interpreter(
            model_path=str(bundle / art["files"][0]), num_threads=threads
        )
        self.windows = {name: s["window"] for name, s in art["signatures"].items()}
        self.runners = {name: self.interpreter.get_signature_runner(name) for name in self.windows}
        self.k = np.zeros(art["cache_shape"], np.float32)  # [layers, kv_heads, cache_len, dim]
        self.v = np.zeros_like(self.k)
        self.max_context = art["max_context"]
        self.position = 0
        tok = manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(bundle / tok["file"]))
        self.bos = tok["bos_token_id"] if tok["add_bos_token"] else None
        self.eos = set(tok["eos_token_ids"])

    def step(self, ids: list[int]) -> np.ndarray:
        """Run `ids` (at most one window) at the next positions; logits of the last one."""
        name = "prefill" if len(ids) > self.windows["verify"] else "verify"
        name = "decode" if len(ids) == 1 else name
        n, window, start = len(ids), self.windows[name], self.position
        inputs: dict[str, Any] = {
            "tokens": np.array([ids + [0] * (window - n)], np.int32),
            "input_pos": np.arange(start, start + window, dtype=np.int32),
            "k_cache": self.k,
            "v_cache": self.v,
        }
        if name == "prefill":
            inputs["last"] = np.array([n - 1], np.int32)  # the one position given logits
        out = self.runners[name](**inputs)
        self.k[:, :, start : start + n] = out["k_new"][:, :, :n]
        self.v[:, :, start : start + n] = out["v_new"][:, :, :n]
        self.position += n
        logits = out["logits"][0]
        return logits[-1] if name == "prefill" else logits[n - 1]

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = ([self.bos] if self.bos is not None else []) + self.tokenizer.encode(
            prompt, add_special_tokens=False
        ).ids
        if len(ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the compiled context "
                f"of {self.max_context}"
            )
        self.position = 0  # a new conversation: stale cache entries are masked, then rewritten
        chunk = self.windows["prefill"]
        for i in range(0, len(ids), chunk):
            logits = self.step(ids[i : i + chunk])
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))
            out.append(token)
            if token in self.eos:
                break
            logits = self.step([token])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("prompt")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    model = TFLiteModel(args.bundle)
    tokens = model.generate(args.prompt, args.max_new_tokens)
    print(args.prompt + model.tokenizer.decode(tokens))


if __name__ == "__main__":
    main()
