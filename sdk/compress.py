"""Compress a loaded model core in place: weight quantization by tensor group (RTN or GPTQ)
and structured pruning (MLP channels, attention heads and KV groups); `per_block` drives every
calibration-based rewrite.

GPTQ runs block by block: calibration activations enter block l through the already-quantized
blocks before it, the Hessians of block l's linear inputs are accumulated, its linears are
quantized, and its (quantized) outputs feed block l+1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from infopt.costs import pruned_width
from infopt.errors import InvalidArgumentError
from infopt.gptq import Hessian, gptq_quantize
from infopt.model import Block, Decoder
from infopt.quant import QuantEmbedding, QuantLinear, QuantScheme, quantize_rtn

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = ("rtn", "gptq")
Progress = Callable[[str], None]


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted `name` under `root`."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _quantize_linear(
    linear: nn.Linear, scheme: QuantScheme, hessian: torch.Tensor | None, act_order: bool
) -> QuantLinear:
    w = linear.weight.detach().float()
    qw = (
        gptq_quantize(w, hessian, scheme, act_order=act_order)
        if hessian is not None
        else quantize_rtn(w, scheme)
    )
    bias = linear.bias.detach() if linear.bias is not None else None
    return QuantLinear(qw, bias)


def block_schemes(weights: dict[str, str]) -> dict[str, QuantScheme]:
    """Linear name inside a block -> scheme, for the groups that are quantized."""
    out = {}
    for group, names in (("attention", ATTENTION), ("mlp", MLP)):
        if weights.get(group, "fp32") not in ("fp32", "fp16", "bf16"):
            out.update(dict.fromkeys(names, QuantScheme.parse(weights[group])))
    return out


def default_calibration_text() -> str:
    """The calibration text shipped with infopt (original prose, Apache-2.0 like the code)."""
    from importlib import resources

    return (resources.files("infopt") / "data" / "calibration.txt").read_text(encoding="utf-8")


def calibration_batches(ids: Sequence[int], seq_len: int, max_sequences: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows of the calibration token ids."""
    n = min(len(ids) // seq_len, max_sequences)
    if n < 1:
        raise InvalidArgumentError(
            f"calibration text is too short: {len(ids)} tokens, need at "
            f"least one window of {seq_len}"
        )
    return torch.tensor(list(ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


def quantize_model(
    model: Decoder,
    weights: dict[str, str],
    *,
    method: str = "rtn",
    calibration: torch.Tensor | None = None,
    act_order: bool = True,
    progress: Progress | None = None,
) -> None:
    """Quantize the blocks' linears (attention / mlp groups) and the LM head, in place.

    weights maps tensor groups to schemes (`int8`, `int4-g32`, `int4s-g64`, or a float name to
    leave the group as is). GPTQ needs `calibration` token ids [n, seq_len]."""
    if method not in METHODS:
        raise InvalidArgumentError(f"method {method!r}: expected one of {list(METHODS)}")
    if method == "gptq" and calibration is None:
        raise InvalidArgumentError("GPTQ needs calibration text")
    schemes = block_schemes(weights)
    _check_request(model, schemes, weights)  # every refusal before anything changes
    if method == "gptq":
        assert calibration is not None
        _gptq_blocks(model, schemes, calibration, act_order, progress)
    else:
        for i, block in enumerate(model.blocks):
            for name, scheme in schemes.items():
                linear = block.get_submodule(name)
                assert isinstance(linear, nn.Linear)
                replace_module(block, name, _quantize_linear(linear, scheme, None, act_order))
            if progress:
                progress(f"block {i + 1}/{len(model.blocks)}")
    _quantize_embeddings(model, weights)


FLOATS = ("fp32", "fp16", "bf16")


def check_quantization(model: Decoder, weights: dict[str, str]) -> None:
    """Every refusal `quantize_model` would raise for these schemes, without quantizing."""
    _check_request(model, block_schemes(weights), weights)


def _check_request(
    model: Decoder, schemes: dict[str, QuantScheme], weights: dict[str, str]
) -> None:
    for name, scheme in schemes.items():
        sample = model.blocks[0].get_submodule(name)
        assert isinstance(sample, nn.Linear)
        scheme.check_shape(sample.out_features, sample.in_features)
    embed, head = weights.get("embeddings", "fp32"), weights.get("lm_head", "fp32")
    if model.spec.tie_word_embeddings and embed != head:
        raise InvalidArgumentError(
            f"tied embeddings share one table: embeddings={embed!r} and "
            f"lm_head={head!r} must be the same scheme"
        )
    for table_scheme in {embed, head} - set(FLOATS):
        QuantScheme.parse(table_scheme).check_shape(model.spec.vocab_size, model.spec.hidden_size)


def _quantize_embeddings(model: Decoder, weights: dict[str, str]) -> None:
    """Embeddings and LM head by RTN (per row); a tied pair stays one shared table."""
    embed, head = weights.get("embeddings", "fp32"), weights.get("lm_head", "fp32")
    tied = model.spec.tie_word_embeddings
    table = (
        model.embed_tokens.weight.detach().float()
        if isinstance(model.embed_tokens, nn.Embedding)
        else None
    )
    if embed not in FLOATS and table is not None:
        qw = quantize_rtn(table, QuantScheme.parse(embed))
        model.embed_tokens = QuantEmbedding(qw)
        if tied:
            model.lm_head = QuantLinear(qw)  # the same tensors: stored once
    if head not in FLOATS and not tied and isinstance(model.lm_head, nn.Linear):
        model.lm_head = _quantize_linear(model.lm_head, QuantScheme.parse(head), None, False)


@torch.no_grad()
def _gptq_blocks(
    model: Decoder,
    schemes: dict[str, QuantScheme],
    calibration: torch.Tensor,
    act_order: bool,
    progress: Progress | None,
) -> None:
    def quantize(_index: int, name: str, linear: nn.Linear, h: torch.Tensor | None) -> nn.Module:
        return _quantize_linear(linear, schemes[name], h, act_order)

    per_block(model, list(schemes), calibration, quantize, progress, "GPTQ")


# rewrite(block index, linear name, linear, its input Hessian) -> the replacement module
Rewrite = Callable[[int, str, nn.Linear, torch.Tensor | None], nn.Module]


@torch.no_grad()
def per_block(
    model: Decoder,
    names: list[str],
    calibration: torch.Tensor,
    rewrite: Rewrite,
    progress: Progress | None = None,
    label: str = "",
) -> None:
    """Calibration-driven rewriting, block by block: the activations entering block l come
    through the already rewritten blocks before it; `rewrite(l, name, linear, input_hessian)`
    returns the replacement of each named linear of block l."""
    n, seq_len = calibration.shape
    if model.max_len < seq_len:
        model.setup_cache(seq_len)
    pos = torch.arange(seq_len)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    mask = model.causal_mask(pos, seq_len)
    hidden = [model.embed_tokens(calibration[i : i + 1]).float() for i in range(n)]
    for index, block in enumerate(model.blocks):
        hessians = _collect_hessians(block, names, hidden, cos, sin, pos, mask)
        for name in names:
            linear = block.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            replace_module(block, name, rewrite(index, name, linear, hessians[name].h))
        hidden = [block(x, cos, sin, pos, mask) for x in hidden]
        if progress:
            progress(f"{label} block {index + 1}/{len(model.blocks)}")


# Linears that read the same input share one Hessian.
INPUT_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_mid",
}


def _collect_hessians(
    block: Block,
    names: list[str],
    hidden: list[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, Hessian]:
    """Run the calibration activations through `block`, accumulating the input Hessian of each
    named linear (one per distinct input)."""
    by_input: dict[str, Hessian] = {}
    handles = []
    for name in names:
        key = INPUT_OF[name]
        if key in by_input:
            continue
        linear = block.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        acc = by_input[key] = Hessian(linear.in_features)
        handles.append(
            linear.register_forward_hook(lambda _m, args, _out, acc=acc: acc.add(args[0]))
        )
    try:
        for x in hidden:
            block(x, cos, sin, pos, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: by_input[INPUT_OF[name]] for name in names}


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
        rms = _input_rms(model, "mlp.down_proj", calibration)
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
    rms = _input_rms(model, "self_attn.o_proj", calibration) if calibration is not None else None
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


def _input_rms(model: Decoder, name: str, calibration: torch.Tensor) -> list[torch.Tensor]:
    """RMS over calibration tokens of each input channel of every block's linear `name`."""
    linears = [blk.get_submodule(name) for blk in model.blocks]
    sums = [torch.zeros(cast(nn.Linear, m).in_features) for m in linears]

    def hook(index: int) -> Callable[..., None]:
        def accumulate(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            sums[index].add_(args[0].float().pow(2).sum((0, 1)))  # returns None: output kept

        return accumulate

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(linears)]
    seq_len = calibration.shape[1]
    try:
        if model.max_len < seq_len:
            model.setup_cache(seq_len)
        for row in calibration:
            model(row[None], torch.arange(seq_len), seq_len)
    finally:
        for h in handles:
            h.remove()
    return [(s / calibration.numel()).sqrt() for s in sums]
