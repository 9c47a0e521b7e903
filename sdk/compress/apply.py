"""A plan applied to a model core: structured MLP pruning, low-rank factorization (whitened SVD,
the same share of every layer), then quantization (GPTQ when calibration is asked for,
round-to-nearest otherwise), in place, in that order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from infopt.core.model import Decoder
from infopt.core.progress import Progress
from infopt.errors import InvalidArgumentError
from infopt.plan.planner import Plan

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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

    done: dict[str, Any] = {}
    weights = dict(p.compression["weights"])
    sparsity = float(p.pruning.get("sparsity") or 0.0)
    # a bad (hand-edited) plan fails here, before any work
    if p.pruning.get("kind", "none") not in ("none", "structured-mlp-channels"):
        raise InvalidArgumentError(f"plan pruning kind {p.pruning.get('kind')!r} is not buildable")
    if not 0 <= sparsity < 1:
        raise InvalidArgumentError(f"plan pruning sparsity {sparsity}: must be in [0, 1)")
    if p.low_rank_ratio is not None and not 0 < p.low_rank_ratio <= 1:
        raise InvalidArgumentError(f"plan low_rank_ratio {p.low_rank_ratio}: must be in (0, 1]")
    check_quantization(core, weights)
    if sparsity:
        done["mlp_intermediate_size"] = prune_mlp_channels(core, sparsity, calibration)
    if p.low_rank_ratio is not None:
        # the same share of every layer: a global budget spread by the layers' whitened spectra
        # scored worse on the default model (docs/quality.md)
        ranks = low_rank_model(core, p.low_rank_ratio, calibration)
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


def _cast_float_groups(core: Decoder, weights: dict[str, str]) -> None:
    """A plan with every group fp16 (or bf16) stores the whole model in that dtype, the
    precision the runtime computes in. Where some groups are quantized, the float parts stay
    fp32: the reference runtime computes in one dtype, and quantized weights dequantize to it."""
    kinds = set(weights.values())
    if len(kinds) == 1 and (dtype := FLOAT_DTYPES.get(kinds.pop())) is not None:
        core.to(dtype)


def symmetric(weights: dict[str, str]) -> dict[str, str]:
    """Asymmetric INT4 groups made symmetric ones of the same group size (int4-g32 ->
    int4s-g32), for targets whose INT4 weights carry no zero points."""
    return {
        g: s.replace("int4-", "int4s-", 1) if s.startswith("int4-") else s
        for g, s in weights.items()
    }


def make_symmetric(p: Plan, targets: Iterable[str]) -> None:
    """The plan's INT4 groups made symmetric for `targets`, said in the plan's reasons."""
    weights = p.compression["weights"]
    changed = sorted(g for g, s in weights.items() if s.startswith("int4-"))
    weights.update(symmetric(weights))
    if changed:
        p.reasons.append(
            f"{' and '.join(targets)}: {', '.join(changed)} quantized symmetric INT4 "
            f"({weights[changed[0]]}), the form these runtimes' INT4 weights take"
        )
