"""The mobile targets on the default model. TFLite (run here on LiteRT's XNNPACK delegate): the
model's first layers, converted, generate the PyTorch runtime's very tokens. Core ML (built here,
predicted only on macOS): the graph it is converted from computes the model core's logits
exactly, and the package holds what the manifest tells an app (that part in test_bundle_e2e.py,
on its apple-ane bundle)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import infopt
from infopt.runtimes.coreml import export as ce
from infopt.runtimes.pytorch.runtime import PyTorchRuntime
from infopt.runtimes.tflite import runtime as tfl_rt
from tests.integration.conftest import QUESTION, fresh_env_generate

# Every layer converts to the same operators, and the conversion's time grows with the layers
# (a single-threaded trace: minutes for all 30), so the test converts the first four, with the
# real vocabulary, widths, weights and tokenizer. The whole model's LiteRT bundles are built and
# measured by `python -m infopt.tools.runtime_bench --matrix DIR --tflite`, and compared with
# the PyTorch runtime by `python -m infopt.tools.runtime_check --matrix DIR --tflite`.
LAYERS = 4
PROMPTS = [
    QUESTION,
    [{"role": "user", "content": "Write a haiku about the sea."}],
    "The history of the printing press begins",
    "def quicksort(arr):\n",
]


@pytest.fixture(scope="module")
def shallow(smol: infopt.Model) -> tuple[infopt.Model, infopt.Model]:
    """(the default model's first LAYERS layers on LiteRT from their fp32 conversion, the same
    core on the PyTorch runtime), both with a 1,024-token context."""
    core = copy.deepcopy(smol.runtime.model)
    core.layers = nn.ModuleList(list(core.layers)[:LAYERS])
    core.spec = dataclasses.replace(core.spec, num_layers=LAYERS)
    tflite = tfl_rt.from_model(core, max_context=1024, threads=2)
    reference = PyTorchRuntime(core, 1024)
    return tuple(  # type: ignore[return-value]
        infopt.Model(rt, smol.tokenizer, core.spec, defaults=smol.defaults)
        for rt in (tflite, reference)
    )


def test_tflite_fp32_generates_the_pytorch_tokens(
    shallow: tuple[infopt.Model, infopt.Model],
) -> None:
    tflite, reference = shallow
    assert tflite.runtime.name == "tflite"
    for prompt in PROMPTS:  # 2 chat, 2 plain: up to 48 greedy tokens each, token for token
        want = reference.generate(prompt, max_new_tokens=48)
        got = tflite.generate(prompt, max_new_tokens=48)
        assert want.finish_reason == "length" and got.token_ids == want.token_ids, prompt
    # generate() ran the prefill and decode signatures; all the logits of a prompt longer than
    # one prefill window run the verify one, window after window
    ids = tflite.tokenizer.encode("The capital of France is Paris. " * 12)
    for model in shallow:
        model.runtime.reset()
    expected = reference.runtime.forward(ids)
    np.testing.assert_allclose(tflite.runtime.forward(ids), expected, rtol=1e-4, atol=1e-4)


def test_tflite_prompt_beyond_the_compiled_context_names_both_lengths(
    shallow: tuple[infopt.Model, infopt.Model],
) -> None:
    named = r"prompt \(\d+ tokens\).* context window of 1024"
    with pytest.raises(infopt.ContextLengthError, match=named):
        shallow[0].generate("word " * 1100, max_new_tokens=4)


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
    tiny_tflite_bundle: Path, tmp_path: Path
) -> None:
    # tflite-runtime, the package the brief names (its last release, 2.14, predates numpy 2),
    # stands in for ai-edge-litert: same tokens, in an environment with neither torch nor LiteRT
    # (the tiny model's bundle: the same operators as the default model's, a fraction of its
    # conversion time)
    result = fresh_env_generate(
        tmp_path,
        tiny_tflite_bundle,
        ["tflite-runtime==2.14.0", "numpy<2"],
        ["torch", "transformers", "ai_edge_litert"],
        max_context=96,  # the context it was compiled for
    )
    assert result["runtime"] == "tflite"
    here = infopt.load(tiny_tflite_bundle, max_context=96, threads=2)
    assert result["ids"] == here.generate(QUESTION, max_new_tokens=24).token_ids
