"""GPTQ (Frantar et al., 2022): quantize a weight column by column, folding each column's
rounding error into the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs.

Done properly: H = 2/n * X^T X from calibration activations, dampening, a Cholesky-based inverse
(its upper Cholesky factor drives the updates), lazy updates in blocks, optional act-order (the
columns with the largest Hessian diagonal first). With act-order, group scales are fixed from
the original column order before quantizing ("static groups"), so storage stays contiguous.
"""

from __future__ import annotations

import torch

from infopt.core.quant import (
    QuantizedWeight,
    QuantScheme,
    check_finite,
    from_codes,
    group_params,
    quantize_codes,
)
from infopt.errors import InvalidArgumentError


class Hessian:
    """Accumulates H = 2/n * sum x x^T over calibration inputs x [..., in]."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.h *= self.n / (self.n + x.shape[0])
        self.n += x.shape[0]
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize `w` [out, in] given the input Hessian [in, in]."""
    check_finite(w, "weight")
    out, inp = w.shape
    scheme.check_shape(out, inp)
    if scheme.offset:
        raise InvalidArgumentError(
            f"{scheme.name}: GPTQ quantizes to integer grids (int8, int4, int4s); the offset "
            "forms (int4m, int8m: a GGUF's Q4_1, Q4_K, Q5_1, Q5_K blocks) are kept as the file "
            "has them, or made by RTN"
        )
    if not 0 < damp < 1:
        raise InvalidArgumentError(f"damp={damp}: must be in (0, 1)")
    group = scheme.group_size or inp
    block_size = max(group, block_size // group * group) if scheme.group_size else block_size
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Group grids from the original weights: kept with act-order (static groups), otherwise
    # recomputed as each group is reached.
    grouped = W.float().reshape(out, inp // group, group)
    scale_g, zero_g = (t[..., 0] for t in group_params(grouped, scheme))  # [out, groups]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(inp)
    W, H = W[:, perm], H[perm][:, perm]
    col_group = perm // group  # group of each (permuted) column in original order

    H += damp * torch.mean(torch.diag(H)) * torch.eye(inp, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros_like(W)
    for i1 in range(0, inp, block_size):
        i2 = min(i1 + block_size, inp)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=W.dtype)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, g = W1[:, i], col_group[i1 + i]
            if scheme.group_size and not act_order and (i1 + i) % group == 0:
                # the grid of a group from its columns as updated so far (the reference method)
                s, z = group_params(W1[:, i : i + group].float(), scheme)
                scale_g[:, g], zero_g[:, g] = s[:, 0], z[:, 0]
            scale, zero = scale_g[:, g].double(), zero_g[:, g].double()
            q = quantize_codes(col, scale, zero, scheme)
            codes[:, i1 + i] = q
            err = (col - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return from_codes(codes, scale_g, zero_g, scheme)
