"""One Model shared by threads and streams: requests batched together, each as if alone; the
prefix cache; slots freed when a stream is closed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import infopt

PROMPTS = ["The quick brown fox", "hello there", "Once upon a time", "def add(a, b):"]
GREEDY = {"stop_token_ids": [], "temperature": 0}


def eight_threads(m: Any) -> None:
    """8 threads x 50 calls on one Model equal the serial results, call for call."""
    calls = [(PROMPTS[i % len(PROMPTS)], 4 + i % 5) for i in range(8 * 50)]

    def run(call: tuple[str, int]) -> list[int]:
        prompt, n = call
        return list(m.generate(prompt, max_new_tokens=n, **GREEDY).token_ids)

    serial = {call: run(call) for call in set(calls)}
    start = threading.Barrier(8)

    def worker(k: int) -> list[tuple[tuple[str, int], list[int]]]:
        start.wait()  # all eight at once
        return [(call, run(call)) for call in calls[k::8]]

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(worker, range(8)) for r in chunk]
    assert len(results) == len(calls)
    assert all(ids == serial[call] for call, ids in results)
    assert m.status() == {"slots": m.slots, "busy": 0, "queued": 0}


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_eight_threads_sharing_a_one_slot_model_get_the_serial_results(
    load_tiny: Any, runtime: str
) -> None:
    eight_threads(load_tiny(runtime, 64))


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch", "openvino"])
def test_eight_threads_batched_on_four_slots_get_the_serial_results(
    tiny_gguf: Path, runtime: str
) -> None:
    m = infopt.load(tiny_gguf, runtime=runtime, max_context=64, slots=4)
    assert m.runtime.batched and m.slots == 4
    eight_threads(m)
    assert m.engine.batched_passes > 0  # they did run together


@pytest.mark.parametrize(
    ("runtime", "blocks"),
    [("onnxruntime", "f32"), ("pytorch", "f32"), ("openvino", "f32"), ("openvino", "q4_1")],
)
def test_a_batch_of_eight_equals_each_request_alone(
    tiny_gguf: Path, tiny_gguf_q41: Path, runtime: str, blocks: str
) -> None:
    """Requests of different lengths joining one running batch: every greedy output is token for
    token the one it gets alone (fp32 weights, or Q4_1 blocks with exact numerics: the batched
    pass computes the same sums)."""
    path = tiny_gguf if blocks == "f32" else tiny_gguf_q41
    settings = {} if blocks == "f32" else {"numerics": "exact"}
    alone_model = infopt.load(path, runtime=runtime, max_context=128, **settings)
    prompts = [p * (1 + i % 3) for i, p in enumerate(PROMPTS * 2)]
    alone = [alone_model.generate(p, max_new_tokens=24, **GREEDY).token_ids for p in prompts]
    m = infopt.load(path, runtime=runtime, max_context=128, slots=8, **settings)
    streams = [m.stream(p, max_new_tokens=24, **GREEDY) for p in prompts]
    # read round-robin from one thread: every stream open at once, joining as it is first read
    live = list(streams)
    while live:
        for s in list(live):
            if next(s, None) is None:
                live.remove(s)
    assert [s.result.token_ids for s in streams] == alone
    assert m.engine.largest_batch >= 4  # joined and left a running batch
    assert m.status()["busy"] == 0


def test_streams_interleaved_in_one_thread_keep_their_own_state(tiny_gguf: Path) -> None:
    for slots in (1, 2):
        m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=slots)
        a_alone = m.generate("hello there", max_new_tokens=6, **GREEDY).text
        b_alone = m.generate("The quick brown fox", max_new_tokens=6, **GREEDY).text
        first = m.stream("hello there", max_new_tokens=6, **GREEDY)
        second = m.stream("The quick brown fox", max_new_tokens=6, **GREEDY)
        a = next(first)
        b = next(second)  # with one slot, this runs the first to its end first
        assert a + "".join(first) == a_alone
        assert b + "".join(second) == b_alone


def test_a_closed_stream_frees_its_slot_for_a_waiting_caller(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=1)
    alone = m.generate("Once upon a time", max_new_tokens=6, **GREEDY).token_ids
    holding = m.stream("hello there", max_new_tokens=40, **GREEDY)
    next(holding)  # holds the one slot
    assert m.status()["busy"] == 1
    got: list[list[int]] = []
    other = threading.Thread(
        target=lambda: got.append(
            m.generate("Once upon a time", max_new_tokens=6, **GREEDY).token_ids
        )
    )
    other.start()
    other.join(timeout=30)  # it drives the held request on to its end, then runs
    assert got == [alone]
    holding.close()
    assert m.status() == {"slots": 1, "busy": 0, "queued": 0}
    # closed early: the slot is free at once, and the next request is unaffected
    with m.stream("The quick brown fox", max_new_tokens=40, **GREEDY) as s:
        next(s)
        assert m.status()["busy"] == 1
    assert m.status()["busy"] == 0
    assert m.generate("Once upon a time", max_new_tokens=6, **GREEDY).token_ids == alone


@pytest.mark.parametrize(
    ("runtime", "blocks"),
    [
        ("onnxruntime", "f32"),
        ("pytorch", "f32"),
        ("openvino", "f32"),
        ("onnxruntime", "q4_1"),
        ("openvino", "q4_1"),
    ],
)
def test_the_prefix_cache_serves_a_chat_s_next_turn(
    tiny_gguf: Path, tiny_gguf_q41: Path, runtime: str, blocks: str
) -> None:
    """Turn two of a chat reads only what is new, and answers as a cold model does (a
    quantized graph with exact numerics too: its fast int8 activations round by pass shape)."""
    path = tiny_gguf if blocks == "f32" else tiny_gguf_q41
    settings = {} if blocks == "f32" else {"numerics": "exact"}
    m = infopt.load(path, runtime=runtime, max_context=256, slots=2, **settings)
    chat = [{"role": "user", "content": "Tell me about foxes."}]
    first = m.generate(chat, max_new_tokens=12, **GREEDY)
    chat += [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And dogs?"},
    ]
    second = m.generate(chat, max_new_tokens=12, **GREEDY)
    assert second.stats.cached_tokens >= first.stats.prompt_tokens - 1
    cold = infopt.load(path, runtime=runtime, max_context=256, **settings)
    assert cold.generate(chat, max_new_tokens=12, **GREEDY).token_ids == second.token_ids
    # the same prompt again prefills its last pass again: from where turn two's began
    again = m.generate(chat, max_new_tokens=12, **GREEDY)
    assert again.stats.cached_tokens == second.stats.cached_tokens
    assert again.token_ids == second.token_ids


def test_a_repeated_request_gets_the_same_logits_from_fast_kernels(
    tiny_gguf_q41: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast INT4 kernels round a several-token pass unlike a one-token one: a repeat fed only
    its last token would sample from other logits (other text for the same seed). It runs the
    pass that ended the prompt again, as it ran: bit for bit the same logits, short prompts
    and long ones (prefilled in chunks: only the last chunk again)."""
    m = infopt.load(tiny_gguf_q41, runtime="onnxruntime", max_context=256)
    chunk = 16  # prompts longer than this prefill in chunks
    monkeypatch.setattr("infopt.decode.engine.PREFILL_CHUNK", chunk)
    passes: list[tuple[int, np.ndarray]] = []
    forward = m.runtime.forward

    def recorded(ids: list[int], only_last: bool = False) -> np.ndarray:
        out = forward(ids, only_last=only_last)
        passes.append((len(ids), np.array(out[-1])))
        return out

    monkeypatch.setattr(m.runtime, "forward", recorded)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    for prompt in ("The quick brown fox jumps", long):
        first = m.generate(prompt, max_new_tokens=1, temperature=0.9, seed=1)
        made, passes[:] = list(passes), []
        again = m.generate(prompt, max_new_tokens=1, temperature=0.9, seed=1)
        n = first.stats.prompt_tokens
        assert again.stats.cached_tokens == (n - 1) // chunk * chunk
        assert [size for size, _ in passes] == [n - again.stats.cached_tokens]
        assert np.array_equal(passes[-1][1], made[-1][1]) and again.token_ids == first.token_ids


def test_sampled_and_speculative_requests_stay_per_request_in_a_batch(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=128, slots=4)
    settings: list[dict[str, Any]] = [
        {"temperature": 0.8, "seed": 3},
        {"temperature": 0.8, "seed": 4, "top_k": 5},
        {"speculative": "ngram", "temperature": 0},
        {"temperature": 0, "stop": ["e"]},
    ]
    alone = [
        m.generate(PROMPTS[i], max_new_tokens=16, stop_token_ids=[], **s).text
        for i, s in enumerate(settings)
    ]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(
                lambda i: (
                    m.generate(PROMPTS[i], max_new_tokens=16, stop_token_ids=[], **settings[i]).text
                ),
                range(4),
            )
        )
    assert together == alone


def test_slots_that_do_not_fit_in_memory_are_refused_naming_the_shortfall(
    tiny_gguf: Path,
) -> None:
    with pytest.raises(infopt.MemoryBudgetError, match=r"slots x 64 positions need .* \(short"):
        infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=10**8)
    with pytest.raises(infopt.InvalidArgumentError, match="slots=0"):
        infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=0)


def test_cancel_from_another_thread_frees_a_waiting_or_running_request_at_once(
    tiny_gguf: Path,
) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=256, slots=1)
    holding = m.stream("hello there", max_new_tokens=200, **GREEDY)
    next(holding)  # holds the one slot
    waiting = m.stream("Once upon a time", max_new_tokens=200, **GREEDY)
    got: list[str | None] = []
    reader = threading.Thread(target=lambda: got.append(next(waiting, None)))
    # the reader drives the holder's steps while it waits for the slot; cancel it from here
    reader.start()
    waiting.cancel()
    reader.join(timeout=30)
    assert not reader.is_alive() and got == [None] and waiting.result is None
    holding.cancel()  # a running request: its slot is free before the next read
    assert m.status() == {"slots": 1, "busy": 0, "queued": 0}
    assert next(holding, None) is None


def test_requests_arriving_together_start_as_one_batch_with_a_batch_wait(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=4)
    alone = [m.generate(p, max_new_tokens=8, **GREEDY).token_ids for p in PROMPTS]

    def arrive_staggered() -> list[list[int]]:
        m.engine.clear_cache()
        m.engine.largest_batch = 0
        start = threading.Barrier(4)

        def run(i: int) -> list[int]:
            start.wait()
            time.sleep(0.05 * i)  # staggered: each lone request would end before the next
            return list(m.generate(PROMPTS[i], max_new_tokens=8, **GREEDY).token_ids)

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(run, range(4)))

    assert arrive_staggered() == alone and m.engine.largest_batch < 4  # one by one
    m.engine.batch_wait_s = 1.0  # the first waits for the others, up to a second
    assert arrive_staggered() == alone and m.engine.largest_batch == 4


def test_the_prefix_cache_is_dropped_when_the_runtime_is_used_directly(tiny_gguf: Path) -> None:
    """Tools that drive `model.runtime` themselves (benchmarks) leave other tokens in its rows:
    the next request must not take them for its prefix."""
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64)
    first = m.generate("The quick brown fox", max_new_tokens=8, **GREEDY)
    ids = m.encode_prompt("The quick brown fox")
    m.runtime.reset()
    m.runtime.forward([(t + 7) % m.runtime.vocab_size for t in ids])  # same length, other KV
    again = m.generate("The quick brown fox", max_new_tokens=8, **GREEDY)
    assert again.stats.cached_tokens == 0 and again.token_ids == first.token_ids


def test_a_model_given_another_runtime_generates_on_it(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64)
    other = infopt.load(tiny_gguf, runtime="pytorch", max_context=64)
    first = m.runtime
    m.runtime = other.runtime
    m.generate("hello there", max_new_tokens=4, **GREEDY)
    assert other.runtime.position > 0 and first.position == 0


def test_a_row_swap_that_fails_halfway_leaves_no_record_to_reuse(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched decoding moves requests' rows together; a swap that fails after moving part of
    the KV (memory, say) must not leave a row's prefix-cache record pointing at moved KV: the
    requests on both rows fail, and a repeat of the row's last prompt computes what a fresh
    model does."""
    from infopt.decode.engine import Engine, Request
    from infopt.decode.sampling import SamplingParams

    def fresh() -> Any:
        return infopt.load(tiny_gguf, runtime="onnxruntime", max_context=64, slots=3).runtime

    def run(engine: Engine, prompt: list[int]) -> list[int]:
        return list(engine.tokens(Request(prompt, SamplingParams(temperature=0.0), 3, [])))

    prompt = [5, 6, 7, 8, 9]
    want = run(Engine(fresh()), prompt)
    rt = fresh()
    engine = Engine(rt)
    run(engine, [5, 6, 7, 40])
    assert run(engine, prompt) == want  # row 0, its record kept
    a = engine.tokens(Request([11, 12, 13], SamplingParams(temperature=0.0), 6, []))
    b = engine.tokens(Request([14, 15], SamplingParams(temperature=0.0), 6, []))
    next(a), next(b)  # rows 1 and 2; their next step decodes both, moved to rows 0 and 1
    real = rt._swap_rows

    def half(x: int, y: int, used: int) -> None:
        _, buf = rt._caches[0]  # one layer's keys moved, then out of memory
        held = buf[x, :, :used].copy()
        buf[x, :, :used], buf[y, :, :used] = buf[y, :, :used], held
        raise MemoryError("out of memory mid-swap")

    monkeypatch.setattr(rt, "_swap_rows", half)
    with pytest.raises(MemoryError):
        list(a)
    with pytest.raises(MemoryError):
        list(b)
    monkeypatch.setattr(rt, "_swap_rows", real)
    assert engine._answered[0] is None and run(engine, prompt) == want
    assert engine.status() == {"slots": 3, "busy": 0, "queued": 0}
