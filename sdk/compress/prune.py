"""Pruning: masks that zero weights (unstructured magnitude or Wanda, 2:4 semi-structured), and
structured pruning that removes MLP channels or attention heads / KV groups, leaving really
smaller matrices.

- Unstructured: magnitude (|W|) or Wanda (|W| x the RMS of each input channel on calibration
  data, Sun et al. 2023), the lowest scores zeroed per output row.
- 2:4 semi-structured: in every group of 4 consecutive inputs, the 2 lowest scores zeroed.
- Structured: a channel's (head's) importance is the norm of its `down_proj` (`o_proj`) columns,
  weighted by the RMS of its activation on calibration text when given.

Masks keep dense storage (zeros), so they change quality, not size or speed, on the reference
runtime; structured pruning stores fewer parameters and, when KV groups go, a smaller KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from infopt.compress.calibration import ATTENTION, MLP, each_linear, input_rms, linear_names
from infopt.core.model import Decoder
from infopt.errors import InvalidArgumentError
from infopt.plan.costs import pruned_width

PRUNE_KINDS = ("magnitude", "wanda", "2:4")


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
    names = linear_names(groups)
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

    each_linear(model, names, calibration if kind != "magnitude" else None, masked)


@torch.no_grad()
def prune_mlp_channels(
    model: Decoder, fraction: float, calibration: torch.Tensor | None = None
) -> int:
    """Structured pruning: remove the same number of MLP channels from every block, so the saved
    model has a smaller intermediate size (real smaller matrices, fewer parameters).

    A channel's importance is the norm of its `down_proj` column times the RMS of its activation
    on calibration text (Wanda's |W|·||x||, per channel), or the column norm alone without
    calibration. Returns the new intermediate size."""
    if not 0 < fraction < 1:
        raise InvalidArgumentError(f"fraction={fraction}: must be in (0, 1)")
    width = model.spec.intermediate_size
    keep = pruned_width(width, 1 - fraction)
    if keep >= width:
        raise InvalidArgumentError(
            f"fraction={fraction} removes no channel of {width} once "
            "rounded to a multiple kernels like; use a larger fraction"
        )
    _require_dense(model, MLP)
    scores = [blk.mlp.down_proj.weight.float().norm(dim=0) for blk in model.blocks]
    if calibration is not None:
        rms = input_rms(model, "mlp.down_proj", calibration)
        scores = [s * a for s, a in zip(scores, rms, strict=True)]
    for blk, score in zip(model.blocks, scores, strict=True):
        idx = torch.topk(score, keep).indices.sort().values
        mlp = blk.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, keep, bias=False)
            new.weight = nn.Parameter(old.weight[idx].clone(), requires_grad=False)
            setattr(mlp, name, new)
        new_down = nn.Linear(keep, mlp.down_proj.out_features, bias=False)
        new_down.weight = nn.Parameter(mlp.down_proj.weight[:, idx].clone(), requires_grad=False)
        mlp.down_proj = new_down
    model.spec = replace(model.spec, intermediate_size=keep)
    return keep


@torch.no_grad()
def prune_attention_heads(
    model: Decoder,
    kv_heads: int | None = None,
    heads_per_group: int | None = None,
    calibration: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Structured pruning of attention: keep `kv_heads` KV groups per block (each with its query
    heads) and/or `heads_per_group` query heads in each kept group. q/k/v rows and o_proj columns
    are cut out, so the saved model has fewer heads (and a smaller KV cache when KV groups go).

    A query head's importance is the norm of its o_proj columns weighted by the RMS of its
    attention output on calibration text (Wanda's |W|·||x||, per head), or the column norm alone
    without calibration; a KV group's is the sum of its query heads'. Every block keeps the same
    counts, so the config stays uniform. Returns (num_heads, num_kv_heads)."""
    spec = model.spec
    groups = spec.num_heads // spec.num_kv_heads
    keep_kv = spec.num_kv_heads if kv_heads is None else kv_heads
    keep_q = groups if heads_per_group is None else heads_per_group
    if not 1 <= keep_kv <= spec.num_kv_heads:
        raise InvalidArgumentError(
            f"kv_heads={kv_heads}: must be in [1, {spec.num_kv_heads}] for this model"
        )
    if not 1 <= keep_q <= groups:
        raise InvalidArgumentError(
            f"heads_per_group={heads_per_group}: must be in [1, {groups}] for this model "
            f"({spec.num_heads} query heads over {spec.num_kv_heads} KV heads)"
        )
    if (keep_kv, keep_q) == (spec.num_kv_heads, groups):
        raise InvalidArgumentError("prune_attention_heads: nothing to remove; lower a count")
    _require_dense(model, ATTENTION)
    d = spec.head_dim
    rms = input_rms(model, "self_attn.o_proj", calibration) if calibration is not None else None
    for i, blk in enumerate(model.blocks):
        attn = blk.self_attn
        channel = attn.o_proj.weight.float().norm(dim=0)
        if rms is not None:
            channel = channel * rms[i]
        score = channel.pow(2).view(spec.num_kv_heads, groups, d).sum(-1).sqrt()  # [kv, q]
        kept_kv = torch.topk(score.sum(1), keep_kv).indices.sort().values
        kept_q = torch.topk(score[kept_kv], keep_q, dim=1).indices.sort(dim=1).values
        q_heads = (kept_kv[:, None] * groups + kept_q).flatten()
        q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (kept_kv[:, None] * d + torch.arange(d)).flatten()
        attn.q_proj = _rows(attn.q_proj, q_rows)
        attn.k_proj = _rows(attn.k_proj, kv_rows)
        attn.v_proj = _rows(attn.v_proj, kv_rows)
        o = nn.Linear(len(q_rows), spec.hidden_size, bias=False)
        o.weight = nn.Parameter(attn.o_proj.weight[:, q_rows].clone(), requires_grad=False)
        attn.o_proj = o
        attn.n_heads, attn.n_kv = keep_kv * keep_q, keep_kv
    model.spec = replace(spec, num_heads=keep_kv * keep_q, num_kv_heads=keep_kv)
    if model.max_len:
        model.setup_cache(model.max_len)  # the cache holds fewer KV heads now
    return model.spec.num_heads, model.spec.num_kv_heads


def _require_dense(model: Decoder, names: Sequence[str]) -> None:
    for i, blk in enumerate(model.blocks):
        for name in names:
            kind = type(blk.get_submodule(name)).__name__
            if kind != "Linear":
                raise InvalidArgumentError(
                    f"structured pruning needs dense linears; layers.{i}.{name} is a {kind}: "
                    "prune first, then quantize or factorize"
                )


def _rows(linear: nn.Module, rows: torch.Tensor) -> nn.Linear:
    assert isinstance(linear, nn.Linear)
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    new.weight = nn.Parameter(linear.weight[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias[rows].clone(), requires_grad=False)
    return new
