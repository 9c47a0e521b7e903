"""Structured output on a real model: every output must parse and validate.

    python -m infopt.tools.structured_check [--model M] [--runtimes onnxruntime,pytorch,openvino]
        [--modes greedy,sampled] [--max-new-tokens 160] [--json]

Runs each of SCHEMAS (JSON schemas: nested objects, arrays, enums, ranged numbers, required
and optional fields) and REGEXES through `generate(response_format=...)` / `generate(regex=...)`
on each runtime, greedy and sampled, and checks every output with `jsonschema` (or the regex's
full match). An output cut by max_new_tokens counts as a failure: the point is that a small
model answers in the format, completely. Free-text fields are bounded (maxLength), as an app
bounds its fields: an unbounded string lets a small model that starts repeating itself run to
max_new_tokens inside the format. Prints the pass counts, the mean time to build a
constraint (grammar compilation) and the decode speed with and without one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import infopt

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Describe a person.", PERSON),
    (
        "Describe a city.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 60},
                "country": {"type": "string", "maxLength": 60},
                "population": {"type": "integer", "minimum": 0, "maximum": 10000000000},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "Rate the movie Inception.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 60},
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            },
            "required": ["title", "stars"],
        },
    ),
    (
        "Is the sky blue?",
        {
            "type": "object",
            "properties": {"answer": {"enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    ),
    (
        "List three fruits.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
        },
    ),
    (
        "Give the temperature in Paris in Celsius.",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 50}},
            "required": ["celsius"],
        },
    ),
    (
        "Describe a book.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 60},
                "author": {
                    "type": "object",
                    "properties": {
                        "first": {"type": "string", "maxLength": 60},
                        "last": {"type": "string", "maxLength": 60},
                    },
                    "required": ["first", "last"],
                },
                "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
            },
            "required": ["title", "author"],
        },
    ),
    (
        "Classify the sentiment of: I love this phone.",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a to-do list with two items.",
        {
            "type": "object",
            "properties": {
                "todos": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "task": {"type": "string", "maxLength": 60},
                            "done": {"type": "boolean"},
                        },
                        "required": ["task", "done"],
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["todos"],
        },
    ),
    (
        "What is 2 + 2?",
        {"type": "object", "properties": {"result": {"type": "integer"}}, "required": ["result"]},
    ),
    (
        "Describe a dog.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 60},
                "breed": {"type": "string", "maxLength": 60},
                "good_boy": {"type": "boolean"},
            },
            "required": ["name", "breed", "good_boy"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a colour in RGB.",
        {
            "type": "object",
            "properties": {
                "r": {"type": "integer", "minimum": 0, "maximum": 255},
                "g": {"type": "integer", "minimum": 0, "maximum": 255},
                "b": {"type": "integer", "minimum": 0, "maximum": 255},
            },
            "required": ["r", "g", "b"],
            "additionalProperties": False,
        },
    ),
    (
        "Name a planet and its order from the sun.",
        {
            "type": "object",
            "properties": {
                "planet": {
                    "enum": [
                        "Mercury",
                        "Venus",
                        "Earth",
                        "Mars",
                        "Jupiter",
                        "Saturn",
                        "Uranus",
                        "Neptune",
                    ]
                },
                "order": {"type": "integer", "minimum": 1, "maximum": 8},
            },
            "required": ["planet", "order"],
        },
    ),
    (
        "Describe an address.",
        {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "city": {"type": "string", "maxLength": 60},
            },
            "required": ["street", "zip", "city"],
        },
    ),
    (
        "Give two numbers and their sum.",
        {
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "b": {"type": "integer"},
                "sum": {"type": "integer"},
            },
            "required": ["a", "b", "sum"],
            "additionalProperties": False,
        },
    ),
    (
        "Describe the weather.",
        {
            "type": "object",
            "properties": {
                "condition": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                "wind_kmh": {"type": "number", "minimum": 0, "maximum": 200},
                "humid": {"type": "boolean"},
            },
            "required": ["condition"],
        },
    ),
    (
        "Give a short user profile.",
        {
            "type": "object",
            "properties": {
                "username": {"type": "string", "minLength": 3, "maxLength": 12},
                "email": {"type": "string", "maxLength": 40},
                "tags": {
                    "type": "array",
                    "items": {"enum": ["admin", "user", "guest"]},
                    "maxItems": 2,
                },
            },
            "required": ["username", "tags"],
        },
    ),
    (
        "Give a matrix of 2 by 2 small integers.",
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["rows"],
        },
    ),
    (
        "Describe a company.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 60},
                "founded": {"type": "integer", "minimum": 1800, "maximum": 2026},
                "public": {"type": "boolean"},
                "ceo": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 60}},
                    "required": ["name"],
                },
            },
            "required": ["name", "founded", "ceo"],
        },
    ),
    (
        "Answer with a list of two cities and their countries.",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 60},
                    "country": {"type": "string", "maxLength": 60},
                },
                "required": ["city", "country"],
            },
            "minItems": 2,
            "maxItems": 2,
        },
    ),
]
REGEXES: list[tuple[str, str]] = [
    ("Pick a colour.", r"(red|green|blue)"),
    ("What year did World War II end?", r"[0-9]{4}"),
    ("Give today's date.", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    ("Is water wet? Answer yes or no.", r"(yes|no)"),
    ("Give a phone number.", r"\+?[0-9]{1,3} [0-9]{3} [0-9]{3} [0-9]{4}"),
    ("Give an email address.", r"[a-z]{3,10}@[a-z]{3,10}\.(com|org|net)"),
    ("Give a time of day.", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("Name an animal in one lowercase word.", r"[a-z]{2,12}"),
    ("Give a price.", r"\$[0-9]{1,4}\.[0-9]{2}"),
    ("Give a hex colour code.", r"#[0-9a-f]{6}"),
]
MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0},
    "sampled": {"temperature": 0.7, "top_p": 0.95, "seed": 7},
    "greedy+ngram": {"temperature": 0, "speculative": "ngram"},  # prompt-lookup drafts
    "sampled+ngram": {"temperature": 0.7, "top_p": 0.95, "seed": 7, "speculative": "ngram"},
}


def valid_json(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def check(model: infopt.Model, mode: str, max_new_tokens: int) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, **MODES[mode]}
    failures: list[str] = []
    passed = 0
    for prompt, schema in SCHEMAS:
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        r = model.generate([{"role": "user", "content": prompt}], response_format=fmt, **settings)
        ok = r.finish_reason == "stop" and valid_json(r.text, schema)
        passed += ok
        if not ok:
            failures.append(f"schema {prompt!r}: {r.finish_reason}, {r.text[:80]!r}")
    for prompt, pattern in REGEXES:
        r = model.generate([{"role": "user", "content": prompt}], regex=pattern, **settings)
        ok = r.finish_reason == "stop" and re.fullmatch(pattern, r.text) is not None
        passed += ok
        if not ok:
            failures.append(f"regex {pattern!r}: {r.finish_reason}, {r.text[:80]!r}")
    return {"passed": passed, "total": len(SCHEMAS) + len(REGEXES), "failures": failures}


def speed(model: infopt.Model, tokens: int = 128) -> dict[str, float]:
    """Decode tok/s of the same prompt with and without a JSON-schema constraint (ignoring the
    end of sequence would leave the grammar; so both decode until the schema's text is done,
    the unconstrained one for as many tokens), and the constraint's set-up time."""
    from infopt.decode.constraints import Constraint, grammar_for, tokenizer_view

    prompt = [{"role": "user", "content": "Describe a person in detail."}]
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 60},
            "biography": {"type": "string", "maxLength": 60},
        },
        "required": ["name", "biography"],
    }
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    view = tokenizer_view(model.tokenizer, model.runtime.vocab_size)
    t = time.perf_counter()
    for _ in range(10):
        Constraint(grammar_for(fmt) or "", view)
    setup_ms = (time.perf_counter() - t) / 10 * 1e3
    best: dict[str, float] = {"constrained": 0.0, "free": 0.0}
    for _ in range(3):
        c = model.generate(prompt, response_format=fmt, max_new_tokens=tokens, temperature=0)
        n = len(c.token_ids)
        f = model.generate(prompt, max_new_tokens=n, stop_token_ids=[], temperature=0)
        best["constrained"] = max(best["constrained"], c.stats.decode_tokens_per_s)
        best["free"] = max(best["free"], f.stats.decode_tokens_per_s)
    return {**best, "cost": 1 - best["constrained"] / best["free"], "setup_ms": setup_ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runtimes", default="onnxruntime,pytorch,openvino")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from infopt.device_profiles.host import cpu_info

    name, flags, _ = cpu_info()
    out: dict[str, Any] = {"cpu": name, "flags": list(flags), "runs": []}
    failed = 0
    for runtime in args.runtimes.split(","):
        model = infopt.load(args.model, runtime=runtime, threads=args.threads, max_context=1024)
        for mode in args.modes.split(","):
            r = check(model, mode, args.max_new_tokens)
            failed += r["total"] - r["passed"]
            out["runs"].append({"runtime": runtime, "mode": mode, **r})
            if not args.json:
                print(f"{runtime:12s} {mode:8s} {r['passed']}/{r['total']} valid", flush=True)
                for f in r["failures"]:
                    print("   ", f)
        if runtime == "onnxruntime":
            out["speed"] = speed(model)
            if not args.json:
                s = out["speed"]
                print(
                    f"{runtime}: decode {s['constrained']:.1f} tok/s with a JSON schema, "
                    f"{s['free']:.1f} without ({100 * s['cost']:.1f} % cost); constraint set-up "
                    f"{s['setup_ms']:.2f} ms"
                )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"CPU {name} ({' '.join(flags)}), {args.threads} threads")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
