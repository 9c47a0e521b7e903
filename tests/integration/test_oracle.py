"""infopt on SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' own GGUF loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import infopt

CHATS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "What are the benefits of regular exercise? Give a detailed answer.",
]
PLAIN = [
    "The history of the printing press begins",
    "def quicksort(arr):\n",
]
NEW_TOKENS = 72


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return [int(t) for t in out[0, len(ids) :]]


def test_chat_template_tokens_match_transformers(smol: infopt.Model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    for question in CHATS:
        messages = [{"role": "user", "content": question}]
        expected = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert smol.encode_prompt(messages) == list(expected)


def test_plain_tokens_match_transformers(smol: infopt.Model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    # No digits here: transformers builds this GGUF's tokenizer without llama.cpp's per-digit split
    # (which SmolLM2's own tokenizer.json has); test_tokenizer covers digits.
    for text in [*PLAIN, "Héllo wörld — naïve café!  Spaces\tand\nnewlines.", " leading space"]:
        assert smol.encode_prompt(text) == hf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("prompt", CHATS + PLAIN)
def test_greedy_tokens_identical_to_transformers(smol: infopt.Model, hf_model, prompt: str) -> None:  # type: ignore[no-untyped-def]
    chat = prompt in CHATS
    ids = smol.encode_prompt([{"role": "user", "content": prompt}] if chat else prompt)
    ours = smol.generate(
        [{"role": "user", "content": prompt}] if chat else prompt,
        max_new_tokens=NEW_TOKENS,
        stop_token_ids=[],
    )
    theirs = hf_greedy(hf_model, ids, NEW_TOKENS)
    assert len(ours.token_ids) == NEW_TOKENS >= 64
    assert ours.token_ids == theirs


def test_prefill_logits_close_to_transformers(smol: infopt.Model, hf_model) -> None:  # type: ignore[no-untyped-def]
    ids = smol.encode_prompt(CHATS[0])
    smol.runtime.reset()
    ours = smol.runtime.forward(ids)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_eos_ends_chat_and_stream_equals_one_shot(smol: infopt.Model) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = smol.generate(messages, max_new_tokens=64)
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in smol.tokenizer.eos_token_ids
    assert "Paris" in result.text
    stream = smol.stream(messages, max_new_tokens=64)
    assert "".join(stream) == result.text
    assert stream.result is not None and stream.result.token_ids == result.token_ids


def test_a_character_cut_by_the_token_limit_is_left_out(smol: infopt.Model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2's byte-level tokens split 😊 and 日本 across tokens (one with a space before the
    cut bytes): text cut inside a character is a plain decode's less its U+FFFD, and where it
    is not cut, transformers' own decode."""
    from infopt.core.tokenizer import StreamDecoder

    ids = smol.tokenizer.encode("ok 😊 日本 アプリ", add_special_tokens=False)
    for cut in range(1, len(ids) + 1):
        stream = StreamDecoder(smol.tokenizer)
        text = "".join(stream.push(i) for i in ids[:cut]) + stream.flush()
        plain = hf_tokenizer.decode(ids[:cut])
        assert text == plain.rstrip("\ufffd") and "\ufffd" not in text, (cut, text, plain)
