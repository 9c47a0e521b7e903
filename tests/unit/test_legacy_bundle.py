"""A bundle written by an earlier infopt (tests/data/legacy/tiny-v1, made by
make_v1_bundle.py before the library's layout changed) still verifies, loads on every runtime
it carries, and generates the tokens it generated then, with and without its draft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import infopt
from infopt.cli import main

LEGACY = Path(__file__).parents[1] / "data" / "legacy"
BUNDLE = LEGACY / "tiny-v1"
EXPECTED: dict[str, Any] = json.loads((LEGACY / "tiny-v1.expected.json").read_text())


def test_the_old_bundle_verifies_and_its_core_ml_package_reads_back() -> None:
    result = CliRunner().invoke(main, ["verify", str(BUNDLE), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["files"]) == 19
    assert [p["package"] for p in report["packages"]] == ["model.mlpackage"]
    shown = CliRunner().invoke(main, ["inspect", str(BUNDLE)])
    assert shown.exit_code == 0 and "self-int4" in shown.stdout, shown.output


@pytest.mark.parametrize("runtime", sorted(EXPECTED["runtimes"]))
def test_the_old_bundle_generates_the_same_tokens(runtime: str) -> None:
    want = EXPECTED["runtimes"][runtime]
    model = infopt.load(BUNDLE, runtime=runtime)
    assert model.drafter is not None  # its INT4 self-draft
    for prompt, tokens in zip(EXPECTED["prompts"], want["tokens"], strict=True):
        n = EXPECTED["max_new_tokens"]
        plain = model.generate(prompt, max_new_tokens=n, stop_token_ids=[], speculative=False)
        drafted = model.generate(prompt, max_new_tokens=n, stop_token_ids=[])
        assert plain.token_ids == tokens["plain"]
        assert drafted.token_ids == tokens["speculative"]
    model.runtime.reset()
    logits = model.runtime.forward(model.encode_prompt(EXPECTED["prompts"][1]), only_last=True)
    top = [i for i, _ in want["first_logits_top2"]]
    assert np.argsort(logits[-1])[::-1][:2].tolist() == top
    np.testing.assert_allclose(
        logits[-1][top], [v for _, v in want["first_logits_top2"]], rtol=1e-3, atol=1e-4
    )
