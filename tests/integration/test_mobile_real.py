"""The mobile targets on the default model. TFLite (run here on LiteRT's XNNPACK delegate): the fp32
bundle generates the PyTorch runtime's very tokens. Core ML (built here, predicted only on macOS):
the graph it is converted from computes the model core's logits exactly, and the package holds
what the manifest tells an app (that part in test_bundle_e2e.py, on its apple-ane bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import infopt
from infopt.bundle import verify_bundle
from infopt.runtimes.coreml import export as ce
from infopt.tools.runtime_bench import MATRIX, build_edited
from infopt.tools.runtime_check import compare
from tests.integration.conftest import QUESTION, fresh_env_generate


@pytest.fixture(scope="module")
def tflite_fp32(module_dir: Path) -> Path:
    bundle = module_dir / "tflite-fp32"
    build_edited(bundle, "fp32", MATRIX["fp32"], "tflite,pytorch")
    return bundle


def test_tflite_fp32_generates_the_pytorch_tokens(tflite_fp32: Path, fp32_reference: Any) -> None:
    # the reference: the host fp32 bundle's PyTorch artifact, the same weights (compare checks)
    [row] = compare(str(tflite_fp32), against=fp32_reference)
    assert row["runtime"] == "tflite"
    # 4 prompts (2 chat, 2 plain) x 64 greedy tokens, token for token; 256 positions of logits
    assert row["greedy_identical"] == row["prompts"] == 4, row
    assert row["top1"] == 1.0 and row["max_rel"] < 1e-4, row
    artifact = verify_bundle(tflite_fp32)["artifacts"]["tflite"]
    assert set(artifact["signatures"]) == {"decode", "verify", "prefill"}


def test_tflite_prompt_beyond_the_compiled_context_names_both_lengths(tflite_fp32: Path) -> None:
    model = infopt.load(tflite_fp32, threads=2)
    named = r"prompt \(\d+ tokens\).* context window of 1024"
    with pytest.raises(infopt.ContextLengthError, match=named):
        model.generate("word " * 1100, max_new_tokens=4)


def test_core_ml_graph_matches_the_model_core(smol: infopt.Model, tmp_path: Path) -> None:
    core = smol.runtime.model  # the PyTorch runtime's model core, fp32
    step = ce.stateful_step(core, 256, torch.float32)
    graph = ce.trace(step)
    ids = smol.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")[:8]
    length = ce.cache_len(256)
    core.setup_cache(length)
    with torch.no_grad():
        expected = core(torch.tensor([ids]), torch.arange(8), length)
        got = graph(
            torch.tensor([ids], dtype=torch.int32),
            torch.from_numpy(ce.causal_mask(0, 8, length).astype(np.float32)),
            torch.tensor([0], dtype=torch.int32),
        )
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    core.setup_cache(smol.runtime.max_context)  # the session's model goes on as it was
    smol.runtime.reset()


def test_tflite_bundle_runs_on_tflite_runtime_without_torch(
    tflite_fp32: Path, tmp_path: Path, smol: infopt.Model
) -> None:
    # tflite-runtime, the package the brief names (its last release, 2.14, predates numpy 2),
    # stands in for ai-edge-litert: same tokens, in an environment with neither torch nor LiteRT
    result = fresh_env_generate(
        tmp_path,
        tflite_fp32,
        ["tflite-runtime==2.14.0", "numpy<2"],
        ["torch", "transformers", "ai_edge_litert"],
    )
    assert result["runtime"] == "tflite"
    assert result["ids"] == smol.generate(QUESTION, max_new_tokens=24).token_ids
