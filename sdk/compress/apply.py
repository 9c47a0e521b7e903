"""A plan applied to a model core: structured MLP pruning, low-rank factorization (whitened SVD,
the same share of every layer), then quantization (GPTQ when calibration is asked for,
round-to-nearest otherwise), in place, in that order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from infopt.core.model import Decoder
from infopt.core.progress import Progress
from infopt.errors import InvalidArgumentError
from infopt.plan.planner import Plan

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_plan(p: Plan) -> float:
    """Every refusal a (hand-edited) plan earns before any work: unknown groups or schemes, a
    pruning or low-rank value out of range. Returns the MLP pruning sparsity."""
    from infopt.compress.quantize import FLOATS
    from infopt.core.quant import QuantScheme

    weights = p.compression.get("weights")
    groups = {"embeddings", "lm_head", "attention", "mlp"}
    if not isinstance(weights, dict) or set(weights) != groups:
        raise InvalidArgumentError(
            f"plan compression.weights {weights!r}: give a scheme for each of {sorted(groups)}"
        )
    for group, scheme in weights.items():
        if not isinstance(scheme, str):
            raise InvalidArgumentError(f"plan compression.weights.{group}: {scheme!r} is no scheme")
        if scheme not in FLOATS:
            QuantScheme.parse(scheme)  # raises naming the scheme
    kind, sparsity = p.pruning.get("kind", "none"), p.pruning.get("sparsity") or 0.0
    if kind not in ("none", "structured-mlp-channels"):
        raise InvalidArgumentError(f"plan pruning kind {kind!r} is not buildable")
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise InvalidArgumentError(f"plan pruning sparsity {sparsity!r}: must be in [0, 1)")
    ratio = p.low_rank_ratio
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise InvalidArgumentError(f"plan low_rank_ratio {ratio!r}: must be in (0, 1]")
    return float(sparsity)


def apply_plan(
    core: Decoder,
    p: Plan,
    calibration: torch.Tensor,
    gptq: bool,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Apply the plan's compression to `core` in place; returns what was done."""
    from infopt.compress.low_rank import low_rank_model
    from infopt.compress.prune import prune_mlp_channels
    from infopt.compress.quantize import FLOATS, check_quantization, quantize_model
    from infopt.core.quant import QuantScheme

    done: dict[str, Any] = {}
    kept = stored_groups(core, p.compression["weights"])
    # groups the core holds in their planned scheme already (a model file's blocks) stay so
    weights = {g: "fp32" if g in kept else s for g, s in p.compression["weights"].items()}
    if kept:
        done["kept_from_file"] = sorted(kept)
    sparsity = check_plan(p)
    check_quantization(core, weights)
    if sparsity:
        done["mlp_intermediate_size"] = prune_mlp_channels(core, sparsity, calibration)
    if p.low_rank_ratio is not None:
        if gptq and any(weights[g] not in FLOATS for g in ("attention", "mlp")):
            raise InvalidArgumentError(
                "GPTQ on low-rank factors is not built: quantize a factorized plan by RTN "
                '(plan method "rtn", no --calibration)'
            )
        # the same share of every layer: a global budget spread by the layers' whitened spectra
        # scored worse on the default model (docs/quality.md); ranks a multiple of the blocks'
        # quantization group, which the factors' inner dimension must take
        groups = [QuantScheme.parse(weights[g]).group_size for g in ("attention", "mlp")
                  if weights[g] not in FLOATS]  # fmt: skip
        multiple = max((g or 1 for g in groups), default=1)
        ranks = low_rank_model(core, p.low_rank_ratio, calibration, multiple=multiple)
        done["low_rank_layers"] = sum(r is not None for r in ranks.values())
    method = "gptq" if gptq else "rtn"
    layers, blocks_done = len(core.layers), [0]

    def on_block(_message: str) -> None:
        blocks_done[0] += 1
        if progress:
            progress("quantize", min(blocks_done[0], layers), layers)

    if any(s not in FLOATS for s in weights.values()):
        quantize_model(
            core,
            weights,
            method=method,
            calibration=calibration if gptq else None,
            progress=on_block if progress else None,
        )
        done["quantization"] = method
    _cast_float_groups(core, weights)
    return done


def stored_groups(core: Decoder, weights: dict[str, str]) -> set[str]:
    """The quantized tensor groups `core` already stores in the scheme `weights` gives them (a
    model file loaded with its blocks kept), named as `group_schemes` names them: a group of a
    k-quant mix whose name matches keeps each matrix as the file stores it."""
    from infopt.compress.quantize import FLOATS

    return {g for g, s in group_schemes(core).items() if s not in FLOATS and weights.get(g) == s}


def group_schemes(core: Decoder) -> dict[str, str]:
    """Each tensor group's scheme as `core` stores it: the scheme of most of its weights
    (`group_scheme`), "fp32" for float matrices."""
    from infopt.core.quant import group_scheme

    out = {}
    for group, modules in _group_modules(core).items():
        elements: dict[str, int] = {}
        for scheme, count in (m for module in modules for m in _matrices(module)):
            elements[scheme] = elements.get(scheme, 0) + count
        out[group] = group_scheme(elements)
    return out


def stored_matrices(core: Decoder) -> dict[str, int]:
    """How many of `core`'s matrices (embedding table and head included, a tied head once) each
    scheme stores, most first: what a manifest records beside the groups' names."""
    groups = _group_modules(core)
    if core.spec.tie_word_embeddings:
        del groups["lm_head"]
    counts: dict[str, int] = {}
    for scheme, _ in (m for mods in groups.values() for module in mods for m in _matrices(module)):
        counts[scheme] = counts.get(scheme, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _group_modules(core: Decoder) -> dict[str, list[nn.Module]]:
    return {
        "embeddings": [core.embed_tokens],
        "lm_head": [core.lm_head],
        "attention": [b.self_attn.get_submodule(n) for b in core.blocks for n in ATTENTION],
        "mlp": [b.mlp.get_submodule(n) for b in core.blocks for n in MLP],
    }


def _matrices(module: nn.Module) -> list[tuple[str, int]]:
    """(scheme, weight count) of each matrix one layer stores (a low-rank layer's two factors):
    quantized ones by their scheme, float ones by their dtype (fp32, fp16, bf16)."""
    from infopt.core.quant import QuantStorage

    floats = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    found = [(m.scheme.name, m.shape[0] * m.shape[1])
             for m in module.modules() if isinstance(m, QuantStorage)]  # fmt: skip
    found += [(floats.get(p.dtype, str(p.dtype)), p.numel())
              for p in module.parameters() if p.dim() == 2]  # fmt: skip
    return found


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _cast_float_groups(core: Decoder, weights: dict[str, str]) -> None:
    """A plan with every group fp16 (or bf16) stores the whole model in that dtype, the
    precision the runtime computes in. Where some groups are quantized, the float parts stay
    fp32: the reference runtime computes in one dtype, and quantized weights dequantize to it."""
    kinds = set(weights.values())
    if len(kinds) == 1 and (dtype := FLOAT_DTYPES.get(kinds.pop())) is not None:
        from infopt.core.model import RMSNorm

        # Gemma's norms multiply by 1 + w in float32: rounded to 16 bits near 1 they would move
        kept = {n: m.weight.detach().clone() for n, m in core.named_modules()
                if isinstance(m, RMSNorm) and m.fp32_weight}  # fmt: skip
        core.to(dtype)
        for name, weight in kept.items():
            core.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)


def symmetric(weights: dict[str, str]) -> dict[str, str]:
    """The forms targets whose INT4 weights carry no zero points take: INT4 groups with zero
    points or offsets made symmetric ones of the same group size (int4-g32, int4m-g32 ->
    int4s-g32), INT8 groups per channel (int8-g32, int8m-g32 -> int8)."""

    def plain(s: str) -> str:
        if s.startswith(("int4-", "int4m-")):
            return "int4s-" + s.split("-", 1)[1]
        return "int8" if s.startswith(("int8-", "int8m-")) else s

    return {g: plain(s) for g, s in weights.items()}


def make_symmetric(p: Plan, targets: Iterable[str]) -> str | None:
    """The plan's INT4 groups made symmetric for `targets`; the reason to give, if any
    changed."""
    weights = p.compression["weights"]
    wanted = symmetric(weights)
    changed = sorted(g for g, s in weights.items() if wanted[g] != s)
    weights.update(wanted)
    if not changed:
        return None
    reason = (
        f"{' and '.join(targets)}: {', '.join(changed)} quantized as "
        f"{', '.join(sorted({weights[g] for g in changed}))}, the forms these runtimes' weights "
        "take (symmetric INT4, INT8 per channel)"
    )
    p.reasons.append(reason)
    return reason
