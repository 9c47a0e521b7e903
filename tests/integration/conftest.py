"""Integration tests: the real default model, checked against transformers as the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

import infopt
from infopt.default_model import default_model_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()  # fails loudly (DefaultModelMissingError) if not installed


@pytest.fixture(scope="session")
def smol(gguf_path: Path) -> infopt.Model:
    return infopt.load(gguf_path, threads=2, max_context=1024)


@pytest.fixture(scope="session")
def hf_model(gguf_path: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
