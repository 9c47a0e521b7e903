"""Speculative decoding on the default model: with and without speculation, identical greedy
tokens over chat, code, summarization and rewriting prompts, long outputs that hit
max_new_tokens, and stops (EOS, stop strings) that land inside accepted drafts; on ONNX Runtime,
OpenVINO and PyTorch targets (the session's fp32 bundle; on PyTorch, the chat prompt), with the
bundle's INT4 self-draft (which runs on ONNX Runtime, its default on a CPU) and with prompt
lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

import infopt

ARTICLE = (
    "The Rhine rises in the Swiss Alps and flows north through Lake Constance, then west along "
    "the German-Swiss border to Basel, where it turns north again. It forms part of the border "
    "between France and Germany before flowing through the Rhineland and the Netherlands into "
    "the North Sea. For centuries the river has carried goods between the industrial heart of "
    "Europe and the sea, and its valley holds many castles, vineyards and old towns."
)
PROMPTS = {
    "chat": [{"role": "user", "content": "What are three good habits for staying healthy?"}],
    "code": [{"role": "user", "content": "Write a Python function that merges two sorted lists."}],
    "summarize": [{"role": "user", "content": f"Summarize this text:\n{ARTICLE}"}],
    "rewrite": [{"role": "user", "content": f"Repeat this text, fixing nothing:\n{ARTICLE}"}],
}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "pytorch"])
def test_greedy_output_is_the_targets_own(fp32_bundle: Path, runtime: str) -> None:
    m = infopt.load(fp32_bundle, runtime=runtime, threads=2)
    drafted = 0
    # PyTorch's float32 decode is the slowest here: the chat prompt alone (the long outputs run
    # on the other two targets, the stops inside drafts on ONNX Runtime)
    names = ("chat",) if runtime == "pytorch" else tuple(PROMPTS)
    for name in names:
        prompt = PROMPTS[name]
        n = 160 if name == "rewrite" else 64
        plain = m.generate(prompt, max_new_tokens=n, speculative=False)
        for speculative in (None, "ngram"):  # the bundle's INT4 self-draft, prompt lookup
            spec = m.generate(prompt, max_new_tokens=n, speculative=speculative)
            assert spec.token_ids == plain.token_ids, (runtime, name, speculative)
            assert spec.finish_reason == plain.finish_reason
            assert spec.stats.speculative is not None
            drafted += spec.stats.speculative.drafted
    assert drafted > 0


def test_stops_inside_accepted_drafts(fp32_bundle: Path) -> None:
    m = infopt.load(fp32_bundle, runtime="onnxruntime", threads=2)
    prompt = PROMPTS["rewrite"]
    plain = m.generate(prompt, max_new_tokens=120, speculative=False)
    assert plain.finish_reason == "length"  # a long output that hits max_new_tokens
    ids = plain.token_ids
    cut = max(i for i in range(len(ids)) if ids[i] not in ids[:i])  # a token's first use
    assert cut >= 20
    for speculative in (None, "ngram"):
        eos = m.generate(
            prompt, max_new_tokens=120, stop_token_ids=[ids[cut]], speculative=speculative
        )
        assert eos.token_ids == ids[: cut + 1] and eos.finish_reason == "stop"
        stop = plain.text[len(plain.text) // 2 :][:12]
        a = m.generate(prompt, max_new_tokens=120, stop=stop, speculative=False)
        b = m.generate(prompt, max_new_tokens=120, stop=stop, speculative=speculative)
        assert a.text == b.text and b.finish_reason == "stop" and stop not in b.text
        assert b.stats.speculative is not None and b.stats.speculative.accepted > 0
