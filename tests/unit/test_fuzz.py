"""Seeded mutants of sound inputs, a few dozen per reader: each is read successfully or refused
with a typed error, never another exception (`tools/fuzz.py` runs the same mutators for
minutes, with hang and memory limits)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infopt.tools.fuzz import READERS, Seeds, run_case

LEGACY = Path(__file__).parents[1] / "data" / "legacy" / "tiny-v1"
CASES = {"gguf": 60, "hf": 60, "safetensors": 60, "manifest": 40, "archive": 40, "template": 80}


@pytest.fixture(scope="module")
def seeds(
    tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_tokenizer: Any
) -> Seeds:
    from tests.conftest import save_hf_folder

    folder = save_hf_folder(tiny_hf, tiny_tokenizer, tmp_path_factory.mktemp("hf") / "t", True)
    return Seeds(tiny_gguf, LEGACY, tmp_path_factory.mktemp("fuzz"), folder)


@pytest.mark.parametrize("reader", READERS)
def test_mutants_are_read_or_refused_with_a_typed_error(
    reader: str, seeds: Seeds, tmp_path: Path
) -> None:
    outcomes: Counter[str] = Counter()
    failures = []
    for case in range(CASES[reader]):
        outcome, _ = run_case(reader, seeds, random.Random(case), tmp_path)
        outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith(("untyped", "wrong")):
            failures.append((case, outcome))
    assert not failures, failures[:5]
    assert outcomes["typed"] > 0  # the mutants do reach the checks
