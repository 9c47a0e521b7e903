"""Bad input at the API gets a typed error naming the value, never a library's own exception
(the hardening issue's reproductions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from infopt import InvalidArgumentError


@pytest.fixture(scope="module")
def model(load_tiny: Any) -> Any:
    return load_tiny("pytorch", 64)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("hi \ud800", r"lone surrogate"),
        ([{"role": "user", "content": "hi \udfff"}], r"messages\[0\]\['content'\].*surrogate"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] = 5: expected a string"),
        ([{"role": "user", "content": None}], r"content'\] = None: expected a string"),
        ([{"role": "wizard", "content": "hi"}], r"'wizard': expected one of \['system', 'user'"),
    ],
)
def test_bad_prompts_are_refused_by_name(model: Any, prompt: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stop": [""]}, r"stop=\[''\]: a stop string cannot be empty"),
        ({"stop": ""}, r"cannot be empty"),
        ({"stop_token_ids": [-1]}, r"-1 is not a token id of this vocabulary \(0 to \d+\)"),
        ({"stop_token_ids": [10**12]}, r"1000000000000 is not a token id"),
        ({"stop_token_ids": ["x"]}, r"'x' is not a token id"),
        ({"stop_token_ids": [True]}, r"True is not a token id"),
    ],
)
def test_bad_stops_are_refused_by_name(model: Any, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate("hello", max_new_tokens=2, **settings)


def test_numpy_token_ids_are_token_ids(model: Any) -> None:
    first = model.generate("hello", max_new_tokens=3, stop_token_ids=[]).token_ids
    r = model.generate("hello", max_new_tokens=3, stop_token_ids=[np.int64(first[0])])
    assert r.token_ids == first[:1] and r.finish_reason == "stop"


HOSTILE_TEMPLATES = {  # (the template, what the refusal names)
    "{% for i in range(10**9) %}x{% endfor %}": r"range\(\) of 1,000,000,000 items",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": (
        r"limit of 1,000,000 operations|limit of 2 s"
    ),
    "{{ 'x' * 10**10 }}": r"repetition of 10,000,000,000",
    "{{ ['x'] * 10**10 }}": r"repetition of 10,000,000,000",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": r"RecursionError",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}": (
        r"limit of 1,000,000 operations|limit of 2 s"
    ),
    "{{ 'x'|center(10**10) }}": r"\|center filter",
    "{{ '%9999999999s'|format('x') }}": r"\|format filter",
    "{{ '{:>9999999999}'.format('x') }}": r"str.format\(\) that would build",
    "{{ 2 ** (10 ** 10) }}": r"a power of",
    "{% set s = 'x' * 1000000 %}{% for i in range(10) %}{{ s }}{% endfor %}": r"characters",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_a_hostile_chat_template_is_refused_within_bounds(model: Any, template: str) -> None:
    import dataclasses
    import time

    from infopt import ModelFormatError

    tokenizer = dataclasses.replace(model.tokenizer, chat_template=template)
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=HOSTILE_TEMPLATES[template]):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 10


def test_a_real_chat_template_renders_as_before(model: Any) -> None:
    # the default model's own template, through every bounded operation
    from infopt.core.default_model import default_model_path
    from infopt.importers import open_model

    tokenizer = open_model(default_model_path()).tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x" * 100_000},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    text = tokenizer.render_chat(messages)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
