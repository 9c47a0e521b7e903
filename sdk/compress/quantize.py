"""Weight quantization of a model core in place, by tensor group: the blocks' linears by RTN or
GPTQ (block by block over calibration activations, see `infopt.compress.calibration`), the
embeddings and LM head by RTN per row (a tied pair stays one table).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from infopt.compress.calibration import ATTENTION, MLP, Progress, per_block
from infopt.compress.gptq import gptq_quantize
from infopt.core.model import Decoder, LowRankLinear, replace_module
from infopt.core.quant import QuantEmbedding, QuantLinear, QuantScheme, quantize_rtn
from infopt.errors import InvalidArgumentError

METHODS = ("rtn", "gptq")
FLOATS = ("fp32", "fp16", "bf16")


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


def _quantize_low_rank(module: LowRankLinear, scheme: QuantScheme) -> nn.Sequential:
    """Low-rank factors quantized as two linears in a row: x -> V (rank r) -> U (+ bias), each
    in `scheme` (the rank must take its group size, as the inputs do)."""
    down = QuantLinear(quantize_rtn(module.v.detach().float(), scheme), None)
    bias = module.bias.detach() if module.bias is not None else None
    return nn.Sequential(down, QuantLinear(quantize_rtn(module.u.detach().float(), scheme), bias))


def block_schemes(weights: dict[str, str]) -> dict[str, QuantScheme]:
    """Linear name inside a block -> scheme, for the groups that are quantized."""
    out = {}
    for group, names in (("attention", ATTENTION), ("mlp", MLP)):
        if weights.get(group, "fp32") not in FLOATS:
            out.update(dict.fromkeys(names, QuantScheme.parse(weights[group])))
    return out


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
    if method == "gptq" and any(
        isinstance(b.get_submodule(n), LowRankLinear) for b in model.blocks for n in schemes
    ):
        raise InvalidArgumentError(
            "GPTQ on low-rank factors is not built: quantize a factorized model by RTN"
        )
    if method == "gptq":
        assert calibration is not None
        _gptq_blocks(model, schemes, calibration, act_order, progress)
    else:
        for i, block in enumerate(model.blocks):
            for name, scheme in schemes.items():
                linear = block.get_submodule(name)
                replace_module(
                    block,
                    name,
                    _quantize_low_rank(linear, scheme)
                    if isinstance(linear, LowRankLinear)
                    else _quantize_linear(cast(nn.Linear, linear), scheme, None, act_order),
                )
            if progress:
                progress(f"block {i + 1}/{len(model.blocks)}")
    _quantize_embeddings(model, weights)


def check_quantization(model: Decoder, weights: dict[str, str]) -> None:
    """Every refusal `quantize_model` would raise for these schemes, without quantizing."""
    _check_request(model, block_schemes(weights), weights)


def _check_request(
    model: Decoder, schemes: dict[str, QuantScheme], weights: dict[str, str]
) -> None:
    for block in model.blocks:
        for name, scheme in schemes.items():
            sample = block.get_submodule(name)
            if isinstance(sample, LowRankLinear):  # both factors: the rank is an input too
                scheme.check_shape(sample.rank, sample.in_features)
                scheme.check_shape(sample.out_features, sample.rank)
            elif isinstance(sample, nn.Linear):
                scheme.check_shape(sample.out_features, sample.in_features)
            else:
                raise InvalidArgumentError(
                    f"{name} is a {type(sample).__name__}, already compressed: quantize once"
                )
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
