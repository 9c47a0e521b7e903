"""Weight pruning masks and low-rank factorization of linear layers.

- Unstructured: magnitude (|W|) or Wanda (|W| x the RMS of each input channel on calibration
  data, Sun et al. 2023), the lowest scores zeroed per output row.
- 2:4 semi-structured: in every group of 4 consecutive inputs, the 2 lowest scores zeroed.
- Low-rank: W [out, in] ~ U [out, r] @ V [r, in], by plain SVD or activation-aware (whitened) SVD
  in the spirit of SVD-LLM: factor W S where S S^T is the input Hessian's Cholesky factor, so the
  truncation minimizes the error on the layer's *outputs* for the calibration inputs.

Masks keep dense storage (zeros), so they change quality, not size or speed, in the PyTorch
runtime; low-rank really stores fewer parameters.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from infopt.compress import Rewrite, per_block, replace_module
from infopt.errors import InvalidArgumentError
from infopt.model import Decoder
from infopt.quant import check_finite


def _check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise InvalidArgumentError(f"sparsity={sparsity}: must be in [0, 1)")


def prune_scores(w: torch.Tensor, input_rms: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude scores, or Wanda's |W| * ||x|| when the inputs' RMS per channel is given."""
    scores = w.abs().float()
    return scores * input_rms.float()[None, :] if input_rms is not None else scores


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the lowest `sparsity` fraction of each output row."""
    _check_sparsity(sparsity)
    drop = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        idx = torch.topk(scores, drop, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def semi_structured_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with exactly n of every m consecutive inputs kept (2:4 by default)."""
    out, inp = scores.shape
    if inp % m:
        raise InvalidArgumentError(
            f"{n}:{m} sparsity needs an input size divisible by {m}, got {inp}"
        )
    groups = scores.reshape(out, inp // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, inp)


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b with U [out, r], V [r, in]: r (in + out) parameters, not in x out."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.u = nn.Parameter(u.contiguous(), requires_grad=False)
        self.v = nn.Parameter(v.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"


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


BLOCK_LINEARS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
PRUNE_KINDS = ("magnitude", "wanda", "2:4")


def _names(groups: tuple[str, ...]) -> list[str]:
    unknown = [g for g in groups if g not in BLOCK_LINEARS]
    if unknown:
        raise InvalidArgumentError(f"groups {unknown}: expected some of {list(BLOCK_LINEARS)}")
    return [n for g in groups for n in BLOCK_LINEARS[g]]


def prune_model(
    model: Decoder,
    kind: str,
    sparsity: float = 0.5,
    calibration: torch.Tensor | None = None,
    groups: tuple[str, ...] = ("attention", "mlp"),
) -> None:
    """Zero weights of the blocks' linears in place: `magnitude`, `wanda` (needs calibration;
    inputs come through the already-pruned blocks) or `2:4` (Wanda scores with calibration,
    magnitude without)."""
    if kind not in PRUNE_KINDS:
        raise InvalidArgumentError(f"pruning kind {kind!r}: expected one of {list(PRUNE_KINDS)}")
    if kind != "2:4":
        _check_sparsity(sparsity)
    if kind == "wanda" and calibration is None:
        raise InvalidArgumentError("Wanda pruning needs calibration text")
    names = _names(groups)
    if kind == "2:4":  # refuse before anything changes
        for name in names:
            linear = model.blocks[0].get_submodule(name)
            assert isinstance(linear, nn.Linear)
            semi_structured_mask(torch.ones(1, linear.in_features))

    def masked(_index: int, _name: str, linear: nn.Linear, h: torch.Tensor | None) -> nn.Module:
        rms = (h.diagonal() / 2).clamp(min=0).sqrt() if h is not None else None
        scores = prune_scores(linear.weight.detach(), rms)
        keep = (
            semi_structured_mask(scores) if kind == "2:4" else unstructured_mask(scores, sparsity)
        )
        linear.weight.data.mul_(keep)
        return linear

    _each_linear(model, names, calibration if kind != "magnitude" else None, masked)


LOW_RANK_ALLOCATIONS = ("uniform", "global")


def low_rank_model(
    model: Decoder,
    keep_params: float | None = None,
    calibration: torch.Tensor | None = None,
    groups: tuple[str, ...] = ("attention", "mlp"),
    *,
    energy: float | None = None,
    allocation: str = "uniform",
) -> dict[str, int | None]:
    """Factorize the blocks' linears: whitened (activation-aware) SVD with calibration, plain SVD
    without. The rank of each layer comes from exactly one of:

    - `keep_params`, allocation `uniform`: every layer keeps that share of its parameters;
    - `keep_params`, allocation `global`: the same total, spread by `allocate_ranks` over all
      layers by their (whitened) spectra — layers that compress well give more;
    - `energy`: each layer's smallest rank retaining that share of its (whitened) energy.

    A layer whose rank would not save parameters stays dense. Returns the rank of every layer by
    name (None: left dense)."""
    names = _names(groups)
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
        if rank is None or rank * (out + inp) >= out * inp:
            chosen[key] = None
            return linear
        chosen[key] = rank
        bias = linear.bias.detach() if linear.bias is not None else None
        dtype = linear.weight.dtype
        return LowRankLinear((u[:, :rank] * s[:rank]).to(dtype), v[:rank].to(dtype), bias)

    _each_linear(model, names, calibration, factor)
    return chosen


def _each_linear(
    model: Decoder, names: list[str], calibration: torch.Tensor | None, rewrite: Rewrite
) -> None:
    """Apply `rewrite` to every named linear of every block: block by block through calibration
    activations (with input Hessians) when given, else directly (no Hessian)."""
    if calibration is not None:
        per_block(model, names, calibration, rewrite)
        return
    for index, block in enumerate(model.blocks):
        for name in names:
            linear = block.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise InvalidArgumentError(f"layers.{index}.{name} is not a dense linear")
            replace_module(block, name, rewrite(index, name, linear, None))


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

    _each_linear(model, names, calibration, record)
    return spectra
