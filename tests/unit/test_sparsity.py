"""Pruning masks and low-rank factorization, layer by layer and on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import infopt
from infopt.compress.calibration import calibration_batches
from infopt.compress.low_rank import (
    allocate_ranks,
    low_rank,
    low_rank_model,
    rank_for,
    rank_for_energy,
)
from infopt.compress.prune import prune_model, prune_scores, semi_structured_mask, unstructured_mask
from infopt.core.model import LowRankLinear
from infopt.core.weights import load_model, save_model
from infopt.errors import InvalidArgumentError
from tests.unit.test_quant import layer_data

IDS = list(range(3, 250, 2)) * 2


def test_unstructured_mask_drops_the_lowest_scores_per_row() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    assert unstructured_mask(scores, 0.5).tolist() == [
        [True, False, True, False],
        [False, True, True, False],
    ]
    assert unstructured_mask(scores, 0.0).all()


def test_wanda_keeps_weights_on_loud_inputs() -> None:
    w = torch.tensor([[1.0, 2.0]])
    assert unstructured_mask(prune_scores(w), 0.5).tolist() == [[False, True]]
    rms = torch.tensor([10.0, 1.0])  # the first input channel is 10x louder
    assert unstructured_mask(prune_scores(w, rms), 0.5).tolist() == [[True, False]]


def test_two_of_four() -> None:
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(0))
    mask = semi_structured_mask(scores)
    assert (mask.reshape(8, 8, 4).sum(-1) == 2).all()
    kept = scores.reshape(8, 8, 4)[mask.reshape(8, 8, 4)].reshape(8, 8, 2)
    dropped = scores.reshape(8, 8, 4)[~mask.reshape(8, 8, 4)].reshape(8, 8, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    with pytest.raises(InvalidArgumentError, match="divisible by 4"):
        semi_structured_mask(torch.rand(2, 6))


@pytest.mark.parametrize("whitened", [False, True])
def test_svd_at_full_rank_reproduces_the_layer(whitened: bool) -> None:
    w, x = layer_data()
    h = 2 * x.double().T @ x.double() / len(x) if whitened else None
    u, v = low_rank(w, min(w.shape), h)
    torch.testing.assert_close(u @ v, w, atol=1e-4, rtol=1e-4)
    layer = LowRankLinear(u, v)
    torch.testing.assert_close(layer(x[:4]), x[:4] @ w.T, atol=1e-3, rtol=1e-3)


def test_whitened_svd_beats_plain_svd_on_the_outputs() -> None:
    w, x = layer_data()
    h = 2 * x.double().T @ x.double() / len(x)
    for rank in (8, 24, 40):
        plain = low_rank(w, rank)
        white = low_rank(w, rank, h)
        err = lambda uv: ((x @ (uv[0] @ uv[1] - w).T) ** 2).mean().item()  # noqa: E731
        assert err(white) < 0.7 * err(plain)


def test_ranks_and_bad_values() -> None:
    assert rank_for(100, 100, 0.5) == 25  # 25 * (100 + 100) = half of 100 * 100
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0, 0.1]), 0.9) == 2
    with pytest.raises(InvalidArgumentError, match="rank=0"):
        low_rank(torch.randn(4, 4), 0)
    with pytest.raises(InvalidArgumentError, match="rank=9"):
        low_rank(torch.randn(8, 16), 9)
    with pytest.raises(InvalidArgumentError, match="keep_params=1.5"):
        rank_for(4, 4, 1.5)
    with pytest.raises(InvalidArgumentError, match="energy=0"):
        rank_for_energy(torch.ones(3), 0)


def block_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        m for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)
    ]


@pytest.mark.parametrize("kind", ["magnitude", "wanda", "2:4"])
def test_prune_model(tiny_gguf: Path, kind: str) -> None:
    m = infopt.load(tiny_gguf, runtime="pytorch", max_context=128)
    core = m.runtime.model
    cal = calibration_batches(IDS, 64, 4) if kind != "magnitude" else None
    prune_model(core, kind, 0.5, cal)
    for linear in block_linears(core):
        zero = (linear.weight == 0).float()
        assert zero.mean().item() == pytest.approx(0.5, abs=0.01)
        if kind == "2:4":
            assert (zero.reshape(linear.out_features, -1, 4).sum(-1) == 2).all()
    core.setup_cache(128)
    m.runtime.reset()
    assert np.isfinite(m.runtime.forward(IDS[:10])).all()
    with pytest.raises(InvalidArgumentError, match="sparsity=1.5"):
        prune_model(core, "magnitude", 1.5)
    with pytest.raises(InvalidArgumentError, match="Wanda pruning needs calibration"):
        prune_model(core, "wanda", 0.5)
    with pytest.raises(InvalidArgumentError, match="pruning kind 'random'"):
        prune_model(core, "random", 0.5)


@pytest.mark.parametrize("calibrated", [False, True])
def test_low_rank_model_stores_fewer_parameters_and_round_trips(
    tmp_path: Path, tiny_gguf: Path, calibrated: bool
) -> None:
    m = infopt.load(tiny_gguf, runtime="pytorch", max_context=128)
    core = m.runtime.model
    before = sum(p.numel() for p in core.parameters())
    low_rank_model(core, 0.5, calibration_batches(IDS, 64, 4) if calibrated else None)
    after = sum(p.numel() for p in core.parameters())
    assert after < before and not block_linears(core)
    core.setup_cache(128)
    m.runtime.reset()
    out = m.runtime.forward(IDS[:10])
    save_model(core, tmp_path / "lr.safetensors")
    loaded = load_model(tmp_path / "lr.safetensors")
    loaded.setup_cache(128)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            loaded(torch.tensor([IDS[:10]]), torch.arange(10), 128)[0].numpy(), out
        )


def test_global_allocation_gives_rank_where_energy_is_spread() -> None:
    steep = torch.tensor([10.0, 1.0] + [0.01] * 62)  # nearly rank 1
    flat = torch.ones(64)
    spectra = {"steep": (steep, 64, 64), "flat": (flat, 64, 64), "tiny": (flat[:8], 8, 8)}
    ranks = allocate_ranks(spectra, 0.5)
    assert ranks["tiny"] is None  # any rank of an 8x8 layer costs as much as the dense one
    assert ranks["steep"] is not None and ranks["flat"] is not None
    assert ranks["steep"] < 4 < ranks["flat"]
    used = 64 + sum(r * 128 for r in (ranks["steep"], ranks["flat"]))
    assert used <= 0.5 * (64 * 64 * 2 + 64) < used + 128  # the budget, spent to the last rank
    with pytest.raises(InvalidArgumentError, match="keep_params=0"):
        allocate_ranks(spectra, 0)


@pytest.mark.parametrize("calibrated", [False, True])
def test_low_rank_by_energy_and_by_global_budget(tiny_gguf: Path, calibrated: bool) -> None:
    from infopt.compress.low_rank import _spectra

    cal = calibration_batches(IDS, 64, 4) if calibrated else None
    core = infopt.load(tiny_gguf, runtime="pytorch", max_context=128).runtime.model
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    spectra = _spectra(core, names, cal)
    ranks = low_rank_model(core, energy=0.8, calibration=cal)
    for key, (s, m, n) in spectra.items():
        if calibrated and not key.startswith("layers.0."):
            continue  # later blocks see inputs through the factorized blocks before them
        want = rank_for_energy(s, 0.8)
        assert ranks[key] == (want if want * (m + n) < m * n else None), key
        module = core.get_submodule(key)
        assert isinstance(module, LowRankLinear if ranks[key] else nn.Linear)

    core = infopt.load(tiny_gguf, runtime="pytorch", max_context=128).runtime.model
    dense = sum(m * n for _, m, n in spectra.values())
    ranks = low_rank_model(core, 0.6, cal, allocation="global")
    kept = sum(
        m * n if ranks[k] is None else cast_rank(ranks[k]) * (m + n)
        for k, (_, m, n) in spectra.items()
    )
    assert kept <= 0.6 * dense and len(set(ranks.values())) > 2  # not one rank for all
    core.setup_cache(128)
    assert torch.isfinite(core(torch.tensor([IDS[:8]]), torch.arange(8), 128)).all()


def cast_rank(rank: int | None) -> int:
    assert rank is not None
    return rank


def test_low_rank_model_refusals(tiny_gguf: Path) -> None:
    core = infopt.load(tiny_gguf, runtime="pytorch", max_context=128).runtime.model
    with pytest.raises(InvalidArgumentError, match="exactly one of keep_params or energy"):
        low_rank_model(core)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        low_rank_model(core, 0.5, energy=0.9)
    with pytest.raises(InvalidArgumentError, match="allocation must be 'uniform'"):
        low_rank_model(core, energy=0.9, allocation="global")
    with pytest.raises(InvalidArgumentError, match="allocation 'best'"):
        low_rank_model(core, 0.5, allocation="best")
    with pytest.raises(InvalidArgumentError, match="energy=1.5"):
        low_rank_model(core, energy=1.5)
    assert not any(isinstance(m, LowRankLinear) for m in core.modules())  # nothing changed
