"""Structured output on the default model: 20 JSON schemas and 10 regexes, every output parses
and validates (`infopt.tools.structured_check`; its full matrix, PyTorch included, is in
docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

import infopt
from infopt.tools.structured_check import REGEXES, SCHEMAS, check


@pytest.mark.parametrize(
    ("runtime", "modes"),
    [("onnxruntime", ("greedy", "sampled", "greedy+ngram")), ("openvino", ("greedy",))],
)
def test_every_output_follows_its_schema_or_regex(
    gguf_path: Path, runtime: str, modes: tuple[str, ...]
) -> None:
    assert len(SCHEMAS) >= 20 and len(REGEXES) >= 10
    model = infopt.load(gguf_path, runtime=runtime, threads=2, max_context=1024)
    for mode in modes:
        result = check(model, mode, max_new_tokens=256)
        assert result["passed"] == result["total"], result["failures"]
