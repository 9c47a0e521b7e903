"""The model core against transformers' own Llama / Qwen2 / Mistral / Qwen3 / Gemma 2 / Gemma 3 /
Phi-3 on tiny random configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from infopt.core.model import Decoder, hf_weights, load_state_dict
from infopt.core.spec import spec_from_hf_config
from tests.conftest import ARCH_CONFIGS, hf_model

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-sliding": ("mistral", {"sliding_window": 5}),
    **ARCH_CONFIGS,
}


def ours_from(hf: Any, max_len: int = 64) -> Decoder:
    spec = spec_from_hf_config(hf.config.to_dict())
    model = Decoder(spec)
    load_state_dict(model, hf_weights(spec, hf.state_dict().items()))
    model.setup_cache(max_len)
    return model.eval()


def run(model: Decoder, ids: torch.Tensor, start: int, window: int = 64) -> torch.Tensor:
    pos = torch.arange(start, start + ids.shape[1])
    with torch.inference_mode():
        return model(ids, pos, window)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_transformers(name: str) -> None:
    arch, overrides = CONFIGS[name]
    hf = hf_model(arch, **overrides)
    ours = ours_from(hf)
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        expected = hf(ids).logits
    torch.testing.assert_close(run(ours, ids, 0), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name", ["llama-gqa-untied", "mistral-sliding", "llama3-rope", *ARCH_CONFIGS]
)
def test_incremental_decode_equals_full_forward(name: str) -> None:
    arch, overrides = CONFIGS[name]
    ours = ours_from(hf_model(arch, **overrides))
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    full = run(ours, ids, 0)
    steps = [run(ours, ids[:, :8], 0)] + [run(ours, ids[:, i : i + 1], i) for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_window_larger_than_needed_changes_nothing() -> None:
    ours = ours_from(hf_model("llama"))
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    narrow = run(ours, ids, 0, window=10)
    wide = run(ours, ids, 0, window=64)
    torch.testing.assert_close(narrow, wide, atol=1e-6, rtol=1e-6)


def test_tied_embeddings_share_one_tensor() -> None:
    ours = ours_from(hf_model("llama", tie_word_embeddings=True))
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()


def test_param_count_from_config_matches_weights() -> None:
    for arch, overrides in CONFIGS.values():
        hf = hf_model(arch, **overrides)
        spec = spec_from_hf_config(hf.config.to_dict())
        assert spec.num_params == sum(p.numel() for p in hf.parameters())


def test_longrope_takes_its_long_factors_past_the_pretraining_context() -> None:
    """A prompt longer than original_max_position_embeddings: transformers switches to the long
    factors for the whole call; infopt takes them for any cache longer than that context."""
    arch, config = ARCH_CONFIGS["phi3"]
    hf = hf_model(arch, **{**config, "original_max_position_embeddings": 16})
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = hf(ids).logits
    long_cache = ours_from(hf, max_len=64)
    torch.testing.assert_close(run(long_cache, ids, 0), expected, atol=1e-4, rtol=1e-4)
    short = ours_from(hf, max_len=64)
    short.setup_cache(64, context=16)  # serving 16 positions: the short factors
    assert (run(short, ids[:, :16], 0) - expected[:, :16]).abs().max() > 1e-2
