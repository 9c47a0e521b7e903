"""Integration tests: the real default model, checked against transformers as the oracle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import infopt
from infopt.core.default_model import default_model_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()  # fails loudly (DefaultModelMissingError) if not installed


@pytest.fixture(scope="session")
def smol(gguf_path: Path) -> infopt.Model:
    return infopt.load(gguf_path, runtime="pytorch", threads=2, max_context=1024)


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default model's host bundle at float32 (ONNX Runtime, OpenVINO and PyTorch artifacts,
    a 1,024-token context) with its INT4 self-draft: built once, for the runtime agreement tests
    and the speculative ones, removed at the end of the session."""
    from infopt.bundle.build import build

    out = tmp_path_factory.mktemp("fp32-bundle") / "fp32-self"
    build(
        None,
        out,
        device="host",
        runtime="onnxruntime,openvino,pytorch",
        context=1024,
        speculative="self",
        quantize="fp32",  # the file is INT4: a self-draft needs a float target, asked for
    )
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def fp32_reference(fp32_bundle: Path) -> Any:
    """The PyTorch artifact of `fp32_bundle` as `runtime_check`'s reference on 256 tokens: any
    bundle of the same float32 weights is compared with it (`compare(against=...)` checks)."""
    from infopt.tools.runtime_check import reference

    return reference(str(fp32_bundle), tokens=256)


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


ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Run in a fresh environment: infopt.load(BUNDLE, max_context=CONTEXT), 24 greedy tokens of
# QUESTION, as JSON; fails if any module named after those two arguments can be imported there.
GENERATE = f"""
import importlib.util, json, sys, infopt
absent = [m for m in sys.argv[3:] if importlib.util.find_spec(m) is not None]
assert not absent, absent
m = infopt.load(sys.argv[1], max_context=int(sys.argv[2]), threads=2)
r = m.generate({QUESTION!r}, max_new_tokens=24)
print(json.dumps({{'ids': r.token_ids, 'text': r.text, 'runtime': m.runtime.name}}))
"""


def fresh_env_generate(
    tmp_path: Path,
    bundle: Path,
    requirements: list[str],
    absent: list[str],
    max_context: int = 256,
) -> dict[str, Any]:
    """Install infopt from its sources (no venv, no build tree) and `requirements` into a new
    virtual environment, check that the modules `absent` cannot be imported there, and run
    GENERATE on `bundle` (loaded with `max_context`) in it, outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("sdk", "runtimes", "device_profiles", "tools"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *requirements, str(src)], check=True, timeout=900)
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", GENERATE, str(bundle), str(max_context), *absent],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # not the repository: the installed infopt is the one imported
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))
