"""One Model shared by threads, and streams interleaved in one thread: never wrong output."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from infopt import ModelBusyError

PROMPTS = ["The quick brown fox", "hello there", "Once upon a time", "def add(a, b):"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_eight_threads_sharing_a_model_get_the_serial_results(load_tiny: Any, runtime: str) -> None:
    m = load_tiny(runtime, 64)
    calls = [(PROMPTS[i % len(PROMPTS)], 4 + i % 5) for i in range(8 * 50)]

    def run(call: tuple[str, int]) -> list[int]:
        prompt, n = call
        return m.generate(prompt, max_new_tokens=n, stop_token_ids=[]).token_ids

    serial = {call: run(call) for call in set(calls)}
    start = threading.Barrier(8)

    def worker(k: int) -> list[tuple[tuple[str, int], list[int]]]:
        start.wait()  # all eight at once
        return [(call, run(call)) for call in calls[k::8]]

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(worker, range(8)) for r in chunk]
    assert len(results) == len(calls)
    assert all(ids == serial[call] for call, ids in results)


def test_a_second_stream_in_the_same_thread_is_refused_while_the_first_is_open(
    load_tiny: Any,
) -> None:
    m = load_tiny("onnxruntime", 64)
    alone = m.generate("hello there", max_new_tokens=6, stop_token_ids=[]).text
    first = m.stream("hello there", max_new_tokens=6, stop_token_ids=[])
    head = next(first)
    second = m.stream("The quick brown fox", max_new_tokens=6, stop_token_ids=[])
    with pytest.raises(ModelBusyError, match="still open in this thread"):
        next(second)
    assert head + "".join(first) == alone  # the first is not disturbed
    with m.stream("The quick brown fox", max_new_tokens=6, stop_token_ids=[]) as third:
        next(third)  # closed early by the with block: the model is free again
    assert m.generate("hello there", max_new_tokens=6, stop_token_ids=[]).text == alone


def test_a_stream_read_in_another_thread_waits_its_turn(load_tiny: Any) -> None:
    m = load_tiny("onnxruntime", 64)
    alone = m.generate("Once upon a time", max_new_tokens=6, stop_token_ids=[]).token_ids
    holding = m.stream("hello there", max_new_tokens=6, stop_token_ids=[])
    next(holding)  # this thread holds the turn
    got: list[list[int]] = []
    other = threading.Thread(
        target=lambda: got.append(
            m.generate("Once upon a time", max_new_tokens=6, stop_token_ids=[]).token_ids
        )
    )
    other.start()
    other.join(timeout=0.5)
    assert other.is_alive() and not got  # waiting, not interleaving
    holding.close()
    other.join(timeout=30)
    assert got == [alone]
