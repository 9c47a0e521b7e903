"""Tool calling on a real model: 10 requests, each with the tool and arguments a person would
expect, over four tools; for each runtime and decoding mode, how many answers call a tool
whose arguments validate (the constraint's promise: every one), call the expected tool, and
give the expected arguments (the model's skill), and how many were cut by max_new_tokens (128)
before their end. A check for docs/benchmarks.md, not a test.

    python -m infopt.tools.tool_check [--model PATH] [--runtimes onnxruntime,openvino,pytorch]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import infopt
from infopt.tools.structured_check import MODES


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> Any:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


CURRENCIES = {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]}
TOOLS = [
    _fn(
        "get_weather",
        "Get the current weather in a city",
        {"city": {"type": "string", "description": "The city's name"}},
        ["city"],
    ),
    _fn(
        "convert_currency",
        "Convert an amount of money from one currency to another",
        {"amount": {"type": "number"}, "from_currency": CURRENCIES, "to_currency": CURRENCIES},
        ["amount", "from_currency", "to_currency"],
    ),
    _fn(
        "set_timer",
        "Start a countdown timer",
        {"minutes": {"type": "integer", "minimum": 1, "maximum": 600}},
        ["minutes"],
    ),
    _fn(
        "send_email",
        "Send an email",
        {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
        ["to", "subject", "body"],
    ),
]
# (request, expected tool, expected arguments: those named must match, case aside)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("What's the weather like in Paris today?", "get_weather", {"city": "Paris"}),
    ("Is it raining in London right now?", "get_weather", {"city": "London"}),
    ("How warm is it in Tokyo?", "get_weather", {"city": "Tokyo"}),
    ("Convert 100 US dollars to euros.", "convert_currency", {"amount": 100}),
    ("How many yen is 50 pounds?", "convert_currency", {"amount": 50}),
    ("Set a timer for 10 minutes.", "set_timer", {"minutes": 10}),
    ("Remind me in 25 minutes to check the oven.", "set_timer", {"minutes": 25}),
    ("Start a 5 minute countdown.", "set_timer", {"minutes": 5}),
    ("Email bob@example.com that the meeting moved to 3pm.", "send_email", {}),
    ("Send alice@example.com an email saying thanks for lunch.", "send_email", {}),
]


def _matches(args: dict[str, Any], expected: dict[str, Any]) -> bool:
    def norm(v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    return all(norm(args.get(k)) == norm(v) for k, v in expected.items())


def check(model: infopt.Model, mode: str, choice: str = "required") -> dict[str, Any]:
    import jsonschema

    settings = MODES[mode]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    called = valid = right_tool = right_args = cut = 0
    t0 = time.perf_counter()
    for request, tool, expected in CASES:
        r = model.generate(
            [{"role": "user", "content": request}],
            tools=TOOLS,
            tool_choice=choice,
            max_new_tokens=128,
            **settings,
        )
        cut += r.finish_reason == "length"
        if not r.tool_calls:
            continue
        called += 1
        call = r.tool_calls[0]
        try:
            jsonschema.validate(call.args, schemas[call.name])
            valid += 1
        except (KeyError, jsonschema.ValidationError):
            pass
        right_tool += call.name == tool
        right_args += call.name == tool and _matches(call.args, expected)
    return {
        "mode": mode,
        "tool_choice": choice,
        "requests": len(CASES),
        "called": called,
        "valid": valid,
        "right_tool": right_tool,
        "right_args": right_args,
        "cut": cut,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model path (default: the default model)")
    parser.add_argument("--runtimes", default="onnxruntime,openvino,pytorch")
    parser.add_argument("--modes", default="greedy,sampled,greedy+ngram")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        "| model | runtime | mode | tool_choice | called | arguments valid | right tool | "
        "right arguments | cut by max_new_tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for runtime in args.runtimes.split(","):
        model = infopt.load(args.model, runtime=runtime, threads=args.threads, max_context=2048)
        name = model.source.rsplit("/", 1)[-1]
        for mode in args.modes.split(","):
            for choice in ("required", "auto"):
                r = check(model, mode, choice)
                n = r["requests"]
                print(
                    f"| {name} ({model.tool_support.format.name}) | {runtime} | {mode} | "
                    f"{choice} | {r['called']}/{n} | {r['valid']}/{r['called']} | "
                    f"{r['right_tool']}/{n} | {r['right_args']}/{n} | {r['cut']} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
