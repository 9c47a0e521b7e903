"""Low-rank factorization of the blocks' linears: W [out, in] ~ U [out, r] @ V [r, in], by plain
SVD or activation-aware (whitened) SVD in the spirit of SVD-LLM: factor W S where S S^T is the
input Hessian's Cholesky factor, so the truncation minimizes the error on the layer's *outputs*
for the calibration inputs. The factors become `LowRankLinear` modules: fewer parameters stored.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from infopt.compress.calibration import each_linear, linear_names
from infopt.core.model import Decoder, LowRankLinear
from infopt.core.quant import check_finite
from infopt.errors import InvalidArgumentError

LOW_RANK_ALLOCATIONS = ("uniform", "global")


def rank_for(out: int, inp: int, keep_params: float) -> int:
    """The rank whose factors hold `keep_params` of the dense layer's parameters."""
    if not 0 < keep_params <= 1:
        raise InvalidArgumentError(f"keep_params={keep_params}: must be in (0, 1]")
    return max(1, min(min(out, inp), int(keep_params * out * inp / (out + inp))))


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """The smallest rank retaining `energy` of the squared singular values."""
    if not 0 < energy <= 1:
        raise InvalidArgumentError(f"energy={energy}: must be in (0, 1]")
    cum = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1


def _svd(
    w: torch.Tensor, hessian: torch.Tensor | None, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V) with W = U diag(s) V. With the input Hessian H = S S^T (Cholesky), the SVD of
    W S, mapped back by S^-1: truncating it minimizes the error on the layer's outputs."""
    W = w.double()
    if hessian is None:
        return torch.linalg.svd(W, full_matrices=False)
    inp = W.shape[1]
    H = hessian.double() + damp * hessian.diagonal().mean().double() * torch.eye(
        inp, dtype=torch.double
    )
    S = torch.linalg.cholesky(H)
    u, s, vh = torch.linalg.svd(W @ S, full_matrices=False)
    return u, s, torch.linalg.solve_triangular(S, vh, upper=False, left=False)  # vh S^-1


def low_rank(
    w: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V ~ W. With the input Hessian (X^T X up to scale), the whitened SVD:
    minimizes ||(W - UV) X^T|| instead of ||W - UV||."""
    check_finite(w, "weight")
    out, inp = w.shape
    if not 1 <= rank <= min(out, inp):
        raise InvalidArgumentError(
            f"rank={rank}: must be in [1, {min(out, inp)}] for a {out}x{inp} layer"
        )
    u, s, v = _svd(w, hessian, damp)
    return (u[:, :rank] * s[:rank]).float(), v[:rank].float()


def allocate_ranks(
    spectra: dict[str, tuple[torch.Tensor, int, int]], keep_params: float
) -> dict[str, int | None]:
    """Ranks for many layers under one parameter budget (`keep_params` of their dense total).

    Each singular value is worth its share of its layer's (whitened) energy, and costs the
    out + in parameters of one rank; the best value per parameter wins, greedily, which is
    optimal for these concave per-layer gains. A layer whose rank would cost as much as the dense
    matrix stays dense (None) and the budget is re-spread over the others."""
    rank_for(2, 2, keep_params)  # validates the ratio
    dense: set[str] = set()
    while True:
        keys = [k for k in spectra if k not in dense]
        budget = keep_params * sum(m * n for _, m, n in spectra.values())
        budget -= sum(spectra[k][1] * spectra[k][2] for k in dense)
        gains, costs, owners = [], [], []
        for i, key in enumerate(keys):
            s, m, n = spectra[key]
            energy = s.double() ** 2
            gains.append(energy / energy.sum().clamp(min=1e-30) / (m + n))
            costs.append(torch.full_like(energy, float(m + n)))
            owners.append(torch.full((len(s),), i, dtype=torch.long))
        order = torch.cat(gains).argsort(descending=True, stable=True)
        taken = order[torch.cumsum(torch.cat(costs)[order], 0) <= budget]
        counts = torch.bincount(torch.cat(owners)[taken], minlength=len(keys))
        ranks: dict[str, int | None] = {
            k: max(1, int(c)) for k, c in zip(keys, counts, strict=True)
        }
        grown = {
            k
            for k in keys
            if cast(int, ranks[k]) * sum(spectra[k][1:]) >= spectra[k][1] * spectra[k][2]
        }
        if not grown:
            return {**ranks, **dict.fromkeys(dense)}
        dense |= grown


def low_rank_model(
    model: Decoder,
    keep_params: float | None = None,
    calibration: torch.Tensor | None = None,
    groups: tuple[str, ...] = ("attention", "mlp"),
    *,
    energy: float | None = None,
    allocation: str = "uniform",
    multiple: int = 1,
) -> dict[str, int | None]:
    """Factorize the blocks' linears: whitened (activation-aware) SVD with calibration, plain SVD
    without. The rank of each layer comes from exactly one of:

    - `keep_params`, allocation `uniform`: every layer keeps that share of its parameters;
    - `keep_params`, allocation `global`: the same total, spread by `allocate_ranks` over all
      layers by their (whitened) spectra — layers that compress well give more;
    - `energy`: each layer's smallest rank retaining that share of its (whitened) energy.

    A layer whose rank would not save parameters stays dense. `multiple`: ranks rounded down to
    a multiple of it (at least one), so that a quantization group size divides them. Returns the
    rank of every layer by name (None: left dense)."""
    names = linear_names(groups)
    if (keep_params is None) == (energy is None):
        raise InvalidArgumentError("give exactly one of keep_params or energy")
    if allocation not in LOW_RANK_ALLOCATIONS:
        raise InvalidArgumentError(
            f"allocation {allocation!r}: expected one of {list(LOW_RANK_ALLOCATIONS)}"
        )
    if energy is not None:
        if allocation != "uniform":
            raise InvalidArgumentError("energy ranks are per layer; allocation must be 'uniform'")
        rank_for_energy(torch.ones(1), energy)  # validate before changing anything
    else:
        rank_for(2, 2, cast(float, keep_params))
    planned: dict[str, int | None] = {}
    if allocation == "global":
        planned = allocate_ranks(_spectra(model, names, calibration), cast(float, keep_params))
    chosen: dict[str, int | None] = {}

    def factor(index: int, name: str, linear: nn.Linear, h: torch.Tensor | None) -> nn.Module:
        key = f"layers.{index}.{name}"
        out, inp = linear.out_features, linear.in_features
        check_finite(linear.weight, key)
        u, s, v = _svd(linear.weight.detach(), h, 0.01)
        if allocation == "global":
            rank = planned[key]
        elif energy is not None:
            rank = rank_for_energy(s, energy)
        else:
            rank = rank_for(out, inp, cast(float, keep_params))
        if rank is not None and multiple > 1:
            rank = max(multiple, rank // multiple * multiple)
        if rank is None or rank * (out + inp) >= out * inp:
            chosen[key] = None
            return linear
        chosen[key] = rank
        bias = linear.bias.detach() if linear.bias is not None else None
        dtype = linear.weight.dtype
        return LowRankLinear((u[:, :rank] * s[:rank]).to(dtype), v[:rank].to(dtype), bias)

    each_linear(model, names, calibration, factor)
    return chosen


def _spectra(
    model: Decoder, names: list[str], calibration: torch.Tensor | None
) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Singular values of every named linear (whitened by its input Hessian when calibrated),
    from the model as it is; nothing is changed."""
    spectra = {}

    def record(index: int, name: str, linear: nn.Linear, h: torch.Tensor | None) -> nn.Module:
        s = _svd(linear.weight.detach(), h, 0.01)[1]
        spectra[f"layers.{index}.{name}"] = (s, linear.out_features, linear.in_features)
        return linear

    each_linear(model, names, calibration, record)
    return spectra
