"""Export the model core to a Core ML ML Program (.mlpackage) for iOS 18 / macOS 15 apps.

The KV cache is Core ML state (a stateful model, as Apple's own LLM examples): `k_cache` /
`v_cache` fp16 [layers, kv_heads, cache_len, head_dim], written in place at `input_pos`. Inputs:
`input_ids` int32 [1, W] with W one of WINDOWS (enumerated shapes, the fixed shapes the Neural
Engine wants: decode, a speculative verify window, a prefill chunk), `causal_mask` fp16
[1, 1, W, cache_len] (0 where query i may see slot j, -inf elsewhere; sliding-window layers narrow
it to their window in the graph), `input_pos` int32 [1] (the first token's position). Output:
`logits` fp16 [1, W, vocab]. Compute is fp16. Quantized weights become Core ML's own
`constexpr_blockwise_shift_scale` weights (INT8 per channel, INT4 per block, symmetric), whose
min-max rule recovers infopt's codes and scales from the dequantized values.

Conversion and inspection run anywhere coremltools installs; prediction needs macOS.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from infopt.core.model import Decoder, attend
from infopt.core.quant import QuantScheme, float_copy
from infopt.core.quiet import quiet_native
from infopt.errors import InvalidArgumentError, RuntimeNotAvailableError
from infopt.runtimes.base import Exported
from infopt.runtimes.coreml import TARGET
from infopt.runtimes.coreml.layout import WINDOWS, cache_len, causal_mask

FILE = "model.mlpackage"
PACKAGE_FILES = (  # what coremltools writes inside a saved ML Program package
    "Manifest.json",
    "Data/com.apple.CoreML/model.mlmodel",
    "Data/com.apple.CoreML/weights/weight.bin",
)
DEPLOYMENT = "iOS18 / macOS15"


class StatefulStep(nn.Module):
    """The model core over one window of tokens, its KV cache held as registered buffers."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, core: Decoder, cache_len: int, cache_dtype: torch.dtype) -> None:
        super().__init__()
        self.core = core
        spec = core.spec
        shape = (spec.num_layers, spec.num_kv_heads, cache_len, spec.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    def forward(
        self,
        input_ids: torch.Tensor,  # int32 [1, W]
        causal_mask: torch.Tensor,  # [1, 1, W, cache_len], additive
        input_pos: torch.Tensor,  # int32 [1]
    ) -> torch.Tensor:
        m, w = self.core, input_ids.shape[-1]
        start = input_pos[0]
        positions = start + torch.arange(w, dtype=torch.int32)
        x = m.embed(input_ids)
        kinds = set(m.spec.layer_kinds)
        ropes = {kind: m.rope_at(kind, positions) for kind in kinds}
        masks = {}
        for kind in kinds:
            mask = causal_mask[0, 0]
            if (sliding := m.spec.window_of(kind)) is not None:  # also when the caller did
                slots = torch.arange(mask.shape[-1], dtype=torch.int32)[None, :]
                far = slots <= positions[:, None] - sliding
                mask = mask.masked_fill(far, float("-inf"))
            masks[kind] = mask
        for i, block in enumerate(m.blocks):
            a = block.self_attn
            groups = a.n_heads // a.n_kv
            q, k, v = a.project(block.input_layernorm(x), *ropes[a.kind])
            self.k_cache[i, :, start : start + w, :] = k[0].to(self.k_cache.dtype)
            self.v_cache[i, :, start : start + w, :] = v[0].to(self.v_cache.dtype)
            k_all = self.k_cache[i].to(q.dtype)[None]
            v_all = self.v_cache[i].to(q.dtype)[None]
            q = q.reshape(1, a.n_kv, groups * w, a.head_dim)  # GQA as in the core
            mask = masks[a.kind].repeat(groups, 1)[None, None].to(q.dtype)
            out = attend(q, k_all, v_all, mask, a.scale, a.softcap)
            out = out.view(1, a.n_heads, w, a.head_dim).transpose(1, 2).reshape(1, w, -1)
            x = block.ffn(block.attn_residual(x, a.o_proj(out)))
        return m.head(x)


def stateful_step(core: Decoder, max_context: int, cache_dtype: torch.dtype) -> StatefulStep:
    """A float32 copy of `core` (quantized layers dequantized) wrapped for conversion."""
    model, _ = float_copy(core)
    model.setup_cache(cache_len(max_context), context=max_context)
    return StatefulStep(model, cache_len(max_context), cache_dtype).eval()


def trace(step: StatefulStep, window: int = WINDOWS[1]) -> Any:
    """The TorchScript trace coremltools converts (made on a copy: tracing writes the cache)."""
    ids = torch.zeros(1, window, dtype=torch.int32)
    mask = torch.from_numpy(causal_mask(0, window, step.k_cache.shape[2]).astype(np.float32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(copy.deepcopy(step), (ids, mask, torch.zeros(1, dtype=torch.int32)))


@contextlib.contextmanager
def _numpy2_int_cast() -> Iterator[None]:
    """coremltools 9.0's torch `int` op calls int() on a folded size held as a 1-element array,
    which numpy >= 2.3 refuses ("only 0-dimensional arrays can be converted"); during our
    conversion, such a size is read with .item() instead."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    original = ops._cast

    def cast(context: Any, node: Any, dtype: Any, dtype_name: str) -> Any:
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.ndim(x.val) > 0 and np.size(x.val) == 1:
            context.add(mb.const(val=dtype(np.asarray(x.val).item()), name=node.name))
            return None
        return original(context, node, dtype, dtype_name)

    ops._cast = cast
    try:
        yield
    finally:
        ops._cast = original


def _weight_configs(schemes: dict[str, QuantScheme], mil_consts: list[str]) -> dict[str, Any]:
    """Per-weight quantizer settings: each weight const op of the converted program (named
    after its torch parameter, `core_layers_3_mlp_up_proj_weight_to_fp16`) gets the scheme
    infopt chose for that layer."""
    import coremltools.optimize.coreml as cto

    def config(s: QuantScheme) -> Any:
        dtype = "int8" if s.bits == 8 else "int4"
        if s.group_size is None:
            return cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=dtype, granularity="per_channel", weight_threshold=1
            )
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype=dtype,
            granularity="per_block",
            block_size=s.group_size,
            weight_threshold=1,
        )

    configs = {}
    for name, scheme in schemes.items():
        const = "core_" + name.replace(".", "_") + "_weight_to_fp16"
        matches = [c for c in mil_consts if c == const]
        if not matches and name == "lm_head" and "embed_tokens" in schemes:
            continue  # tied: the one table, configured as embed_tokens
        if not matches:
            raise InvalidArgumentError(f"no weight {const!r} in the converted Core ML program")
        configs[const] = config(scheme)
    return configs


def check_schemes(schemes: dict[str, QuantScheme]) -> None:
    for name, s in schemes.items():
        if s.bits == 4 and not s.symmetric:
            raise InvalidArgumentError(
                f"{name}: weight scheme {s.name}: infopt's Core ML export carries symmetric INT4 "
                f"(the codes and scales unchanged); use int4s-g{s.group_size}"
            )
        if s.bits == 8 and s.group_size:
            raise InvalidArgumentError(
                f"{name}: weight scheme {s.name}: infopt's Core ML export carries INT8 per "
                "channel; use int8"
            )


def convert(core: Decoder, max_context: int) -> Any:
    """The Core ML model (coremltools MLModel, not loaded for prediction) of `core`."""
    try:
        with quiet_native("coremltools", ("coremltools",)):  # it, torchao, torch warn at import
            import coremltools as ct
            import coremltools.optimize.coreml as cto
    except ImportError as e:
        raise RuntimeNotAvailableError(
            f"building a coreml artifact needs coremltools ({e}); "
            "install it with: pip install 'infopt[coreml]'"
        ) from e

    _, schemes = float_copy(core)
    check_schemes(schemes)
    step = stateful_step(core, max_context, torch.float16)
    length, spec = step.k_cache.shape[2], core.spec
    ids = ct.EnumeratedShapes(shapes=[(1, w) for w in WINDOWS], default=(1, WINDOWS[0]))
    masks = ct.EnumeratedShapes(
        shapes=[(1, 1, w, length) for w in WINDOWS], default=(1, 1, WINDOWS[0], length)
    )
    state_shape = tuple(step.k_cache.shape)
    with quiet_native("coremltools", ("coremltools",)), _numpy2_int_cast():
        model = ct.convert(
            trace(step),
            inputs=[
                ct.TensorType("input_ids", shape=ids, dtype=np.int32),
                ct.TensorType("causal_mask", shape=masks, dtype=np.float16),
                ct.TensorType("input_pos", shape=(1,), dtype=np.int32),
            ],
            outputs=[ct.TensorType("logits", dtype=np.float16)],
            states=[
                ct.StateType(ct.TensorType(shape=state_shape, dtype=np.float16), name=name)
                for name in ("k_cache", "v_cache")
            ],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
        if schemes:
            consts = [
                op.outputs[0].name
                for op in model._mil_program.functions["main"].operations
                if op.op_type == "const"
            ]
            opt = cto.OptimizationConfig(op_name_configs=_weight_configs(schemes, consts))
            float_model = model
            model = cto.linear_quantize_weights(model, config=opt)
            drop_temp_package(float_model)
    model.short_description = f"{spec.architecture}: infopt stateful decoder ({DEPLOYMENT})"
    return model


def drop_temp_package(model: Any) -> None:
    """Remove the package coremltools converted into under the temp folder: it removes it only
    at interpreter exit, so a server or a build of several targets would hold one per
    conversion (the model's size each), and a killed process leaks it for good."""
    if getattr(model, "is_temp_package", False) and model.package_path:
        shutil.rmtree(model.package_path, ignore_errors=True)


def export_coreml(core: Decoder, path: str | Path, max_context: int) -> list[str]:
    """Write `core` (as compressed) as a .mlpackage directory at `path`; returns its files."""
    model = convert(core, max_context)
    try:
        with quiet_native("coremltools", ("coremltools",)):
            model.save(str(path))
    finally:
        drop_temp_package(model)
    written = sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())
    if written != sorted(PACKAGE_FILES):
        raise InvalidArgumentError(f"coremltools wrote {written}, expected {list(PACKAGE_FILES)}")
    return [f"{Path(path).name}/{f}" for f in PACKAGE_FILES]


def coreml_io(core: Decoder, max_context: int) -> dict[str, Any]:
    """What an app needs to call the model itself (the manifest's coreml artifact section)."""
    spec = core.spec
    length = cache_len(max_context)
    return {
        "deployment_target": DEPLOYMENT,
        "compute_precision": "fp16",
        "windows": list(WINDOWS),
        "inputs": {
            "input_ids": "int32 [1, W], W in windows (pad with any id; padded logits are ignored)",
            "causal_mask": f"fp16 [1, 1, W, {length}]: 0 where query i sees slot j "
            "(j <= input_pos + i), -inf elsewhere"
            + (
                f"; sliding layers narrow it to j > input_pos + i - {spec.sliding_window} "
                "themselves"
                if spec.sliding_window
                else ""
            ),
            "input_pos": "int32 [1]: the position of input_ids[0]",
        },
        "outputs": {"logits": f"fp16 [1, W, {spec.vocab_size}]"},
        "states": {
            name: [spec.num_layers, spec.num_kv_heads, length, spec.head_dim]
            for name in ("k_cache", "v_cache")
        },
        "state_dtype": "fp16",
    }


def artifact(core: Decoder, max_context: int, prefix: str = "") -> Exported:
    """The manifest entry of the artifact and the writer of its package (under `prefix`)."""
    package = f"{prefix}{FILE}"
    entry = {
        "files": [f"{package}/{f}" for f in PACKAGE_FILES],
        "package": package,
        "format": "mlpackage (ML Program, stateful)",
        "max_context": max_context,
        "kv_dtype": "fp16",
        "requires": TARGET.installed_requirement(),
        **coreml_io(core, max_context),
    }
    return entry, {package: lambda path: export_coreml(core, path, max_context)}
