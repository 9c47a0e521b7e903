"""Which constrained-decoding library is fastest here: llguidance (infopt's), XGrammar and
outlines-core, on the default model's vocabulary and the 20 JSON schemas of
`structured_check`. A benchmark, not a test; figures go to docs/benchmarks.md.

Two steps, because XGrammar's dependencies (tvm-ffi: typing-extensions >= 4.13) cannot share a
virtual environment with infopt's LiteRT converter (xdsl: typing-extensions < 4.13):

    python -m infopt.tools.grammar_bench export DIR
        (infopt's environment) writes the tokenizer, each token's bytes, and for each schema
        the tokens infopt generates under it on the default model (greedy): real paths
        through each grammar;
    python tools/grammar_bench.py run DIR
        (any environment with llguidance, xgrammar and outlines-core; numpy and tokenizers)
        compiles each schema with each library, then replays each path: per token, the
        library's mask of allowed tokens, then the token fed. Prints a Markdown table.

Every library gets the same compact JSON (separators "," and ":", no free whitespace), the
output infopt asks llguidance for, so every path is valid for each of them (checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPEATS = 3  # each path is replayed this many times; the best is kept


def export(folder: Path, max_new_tokens: int = 160) -> None:
    import infopt
    from infopt.tools.structured_check import SCHEMAS

    folder.mkdir(parents=True, exist_ok=True)
    model = infopt.load(runtime="onnxruntime", numerics="exact", max_context=1024)
    tok = model.tokenizer
    (folder / "tokenizer.json").write_text(tok.backend.to_str())
    view = model.grammar_view  # llguidance's reading of each token's bytes
    vocab = [
        None if view.is_special_token(i) else view.decode_bytes([i]).hex()
        for i in range(model.runtime.vocab_size)
    ]
    meta = {"vocab_size": model.runtime.vocab_size, "eos": list(tok.eos_token_ids)}
    (folder / "vocab.json").write_text(json.dumps({"meta": meta, "tokens": vocab}))
    cases = []
    for prompt, schema in SCHEMAS:
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        r = model.generate(
            [{"role": "user", "content": prompt}],
            response_format=fmt,
            temperature=0,
            max_new_tokens=max_new_tokens,
        )
        tokens = [t for t in r.token_ids if t not in tok.eos_token_ids]  # the text's alone
        if r.finish_reason == "stop":
            cases.append({"schema": schema, "text": r.text, "tokens": tokens})
    (folder / "cases.json").write_text(json.dumps(cases))
    print(f"{len(cases)} schemas with their paths in {folder}")


class Library:
    name = ""

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def replay(self, compiled: Any, tokens: list[int]) -> bool:
        raise NotImplementedError


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        import llguidance
        import llguidance.numpy

        self.llg, self.np = llguidance, llguidance.numpy
        text = (folder / "tokenizer.json").read_text()
        self.view = llguidance.LLTokenizer(text, n_vocab=meta["vocab_size"], eos_token=meta["eos"])
        self.mask = self.np.allocate_token_bitmask(1, meta["vocab_size"])

    def compile(self, schema: dict[str, Any]) -> Any:
        compact = {**schema, "x-guidance": {"whitespace_flexible": False}}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(compact)
        return self.llg.LLMatcher(self.view, grammar)

    def replay(self, matcher: Any, tokens: list[int]) -> bool:
        for t in tokens:
            self.np.fill_next_token_bitmask(matcher, self.mask, 0)
            if not matcher.consume_token(t):
                return False
        return True


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, folder: Path, meta: dict[str, Any], vocab: list[bytes]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, vocab_size=meta["vocab_size"], stop_token_ids=meta["eos"])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, meta["vocab_size"])

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        return self.xgr.GrammarMatcher(compiled)

    def replay(self, matcher: Any, tokens: list[int]) -> bool:
        for t in tokens:
            matcher.fill_next_token_bitmask(self.mask)
            if not matcher.accept_token(t):
                return False
        return True


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, folder: Path, meta: dict[str, Any], vocab: list[bytes]) -> None:
        import numpy as np
        import outlines_core

        self.oc = outlines_core
        pieces: dict[bytes, list[int]] = {}
        for i, piece in enumerate(vocab):
            if piece and i not in meta["eos"]:
                pieces.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(meta["eos"][0], pieces)
        self.mask = np.zeros((meta["vocab_size"] + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def replay(self, guide: Any, tokens: list[int]) -> bool:
        for t in tokens:
            guide.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)
            try:
                guide.advance(t, False)
            except Exception:
                return False
        return True


def run(folder: Path) -> int:
    data = json.loads((folder / "vocab.json").read_text())
    meta = data["meta"]
    vocab = [bytes.fromhex(t) if t else b"" for t in data["tokens"]]
    cases = json.loads((folder / "cases.json").read_text())
    libraries: list[Library] = []
    for make in (
        lambda: LLGuidance(folder, meta),
        lambda: XGrammar(folder, meta, vocab),
        lambda: OutlinesCore(folder, meta, vocab),
    ):
        try:
            libraries.append(make())
        except ImportError as e:
            print(f"skipped: {e}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for lib in libraries:
        compile_ms, token_us, valid, failed = [], [], 0, []
        for case in cases:
            try:
                t0 = time.perf_counter()
                lib.compile(case["schema"])
                compile_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # a schema the library does not support
                failed.append(f"{type(e).__name__}: {str(e)[:60]}")
                continue
            best, ok = float("inf"), True
            for _ in range(REPEATS):
                matcher = lib.compile(case["schema"])
                t0 = time.perf_counter()
                ok = lib.replay(matcher, case["tokens"]) and ok
                best = min(best, time.perf_counter() - t0)
            valid += ok
            token_us.append(best / len(case["tokens"]) * 1e6)
        rows.append(
            {
                "library": lib.name,
                "version": _version(lib.name),
                "schemas": f"{len(compile_ms)}/{len(cases)}",
                "paths_valid": f"{valid}/{len(cases)}",
                "compile_ms_median": (
                    round(statistics.median(compile_ms), 2) if compile_ms else None
                ),
                "compile_ms_max": round(max(compile_ms), 2) if compile_ms else None,
                "mask_us_per_token_median": round(statistics.median(token_us), 1)
                if token_us
                else None,
                "mask_us_per_token_max": round(max(token_us), 1) if token_us else None,
                "unsupported": failed,
            }
        )
    lengths = [len(c["tokens"]) for c in cases]
    print(
        f"CPU: {_cpu()}; vocabulary {meta['vocab_size']} tokens; {len(cases)} schemas, paths "
        f"of {min(lengths)} to {max(lengths)} tokens\n"
    )
    print(
        "| library | version | schemas compiled | paths valid | compile ms (median / max) "
        "| mask+advance µs per token (median / max) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['library']} | {r['version']} | {r['schemas']} | {r['paths_valid']} | "
            f"{r['compile_ms_median']} / {r['compile_ms_max']} | "
            f"{r['mask_us_per_token_median']} / {r['mask_us_per_token_max']} |"
        )
    for r in rows:
        for f in r["unsupported"]:
            print(f"- {r['library']} refused a schema: {f}")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("-", "_"))


def _cpu() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
                flags = " ".join(f for f in wanted if f in have)
                break
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({flags})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="infopt's environment: the vocabulary and the paths")
    e.add_argument("folder", type=Path)
    r = sub.add_parser("run", help="the libraries' environment: compile and replay")
    r.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.step == "export":
        export(args.folder)
        return 0
    return run(args.folder)


if __name__ == "__main__":
    raise SystemExit(main())
