"""Calibration: the text shipped with infopt, token windows of it, and the block-by-block pass
every calibration-based rewrite runs on (GPTQ, Wanda, whitened SVD, channel scores).

`per_block` runs block by block: calibration activations enter block l through the already
rewritten blocks before it, the Hessians of block l's linear inputs are accumulated, its linears
are rewritten, and its (rewritten) outputs feed block l+1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from infopt.compress.gptq import Hessian
from infopt.core.model import Block, Decoder, PassInputs, replace_module
from infopt.errors import InvalidArgumentError

if TYPE_CHECKING:
    from infopt.core.tokenizer import Tokenizer

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_LINEARS = {"attention": ATTENTION, "mlp": MLP}
CALIBRATION_LENGTH, CALIBRATION_WINDOWS = 256, 128  # tokens per window, windows at most
Progress = Callable[[str], None]


def default_calibration_text() -> str:
    """The calibration text shipped with infopt (original prose, Apache-2.0 like the code)."""
    return shipped_text("calibration.txt")


def shipped_text(name: str) -> str:
    """A text file shipped with infopt (`infopt/data/`: original prose, Apache-2.0)."""
    from importlib import resources

    return (resources.files("infopt.data") / name).read_text(encoding="utf-8")


def read_text(text_file: str | Path, what: str) -> str:
    """A UTF-8 text file the caller named (`what` it is for: "calibration text", ...); one it
    cannot read is an InvalidArgumentError naming it, as every bad input is."""
    try:
        return Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise InvalidArgumentError(f"{what} {str(text_file)!r}: {reason}") from e


def calibration_ids(tokenizer: Tokenizer, text_file: str | Path | None = None) -> torch.Tensor:
    """The token windows compression calibrates on: a text file's, or the shipped text's, in
    CALIBRATION_WINDOWS windows of CALIBRATION_LENGTH tokens at most."""
    text = read_text(text_file, "calibration text") if text_file else default_calibration_text()
    return calibration_batches(tokenizer.encode(text), CALIBRATION_LENGTH, CALIBRATION_WINDOWS)


def calibration_batches(ids: Sequence[int], seq_len: int, max_sequences: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows of the calibration token ids."""
    n = min(len(ids) // seq_len, max_sequences)
    if n < 1:
        raise InvalidArgumentError(
            f"calibration text is too short: {len(ids)} tokens, need at "
            f"least one window of {seq_len}"
        )
    return torch.tensor(list(ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


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
    inputs = model.pass_inputs(pos, seq_len)
    hidden = [model.embed(calibration[i : i + 1]).float() for i in range(n)]
    for index, block in enumerate(model.blocks):
        hessians = _collect_hessians(block, names, hidden, pos, inputs)
        for name in names:
            linear = block.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            replace_module(block, name, rewrite(index, name, linear, hessians[name].h))
        hidden = [block(x, pos, inputs) for x in hidden]
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
    pos: torch.Tensor,
    inputs: dict[str, PassInputs],
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
            block(x, pos, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: by_input[INPUT_OF[name]] for name in names}


def input_rms(model: Decoder, name: str, calibration: torch.Tensor) -> list[torch.Tensor]:
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


def linear_names(groups: tuple[str, ...]) -> list[str]:
    """The linears of a block in these tensor groups ("attention", "mlp"), by name."""
    unknown = [g for g in groups if g not in BLOCK_LINEARS]
    if unknown:
        raise InvalidArgumentError(f"groups {unknown}: expected some of {list(BLOCK_LINEARS)}")
    return [n for g in groups for n in BLOCK_LINEARS[g]]


def each_linear(
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
