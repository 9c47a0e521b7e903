"""Export the model core to an OpenVINO IR: a stateful model, as OpenVINO's own LLM pipelines use.

The graph is written module by module from the (possibly compressed) model core with OpenVINO's
opset API, in the patterns the CPU plugin fuses (those of optimum-intel's exports):

- weights keep their stored form: INT4 groups as `u4` codes with `u4` zero-points (or `i4`
  without, when symmetric) and fp16 scales (fp32 for a k-quant's), INT8 rows or groups as `i8`
  with fp16 (fp32) scales, each decompressed right before its MatMul (Convert -> Subtract ->
  Multiply), which the plugin executes as a low-bit kernel; a float offset per group (`int4m`,
  a GGUF's Q4_1 or Q4_K) as `u4` codes times their scales plus the input's per-block sums times
  the offsets (exact in fp32); float weights as fp32 constants; low-rank layers as two MatMuls;
- the KV cache is model state: per layer ReadValue -> Gather(beam_idx) -> Concat -> Assign,
  read by ScaledDotProductAttention (grouped KV heads broadcast as optimum-intel does), which
  the plugin turns into its own in-place cache;
- RMSNorm, rotary embedding (rotate-half) and SwiGLU in the shapes the plugin's fusions match.

Interface (batch 1): input_ids int64 [1, S], attention_mask int64 [1, past + S] (ones),
position_ids int64 [1, S], beam_idx int32 [1] (zero), logits_to_keep int64 [1] ->
logits float32 [1, logits_to_keep, vocab]. States `past_key_values.{i}.key|value`. Nothing in
the graph fixes the batch to 1 but that interface, so OpenVINO's SDPA-to-PagedAttention rewrite
(which makes every token of a pass a batch row) yields a model that decodes several rows at once
(`infopt.runtimes.openvino.runtime.PagedOpenVINORuntime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from infopt.core.model import Block, Decoder, LowRankLinear, rope_angles, rope_kinds
from infopt.core.quant import QuantEmbedding, QuantizedWeight, QuantLinear, stacked, unpack_int4
from infopt.errors import InvalidArgumentError
from infopt.runtimes.base import Exported
from infopt.runtimes.openvino import PAGED, TARGET

XML, BIN = "openvino_model.xml", "openvino_model.bin"


def _ov() -> tuple[Any, Any]:
    import openvino as ov
    from openvino import opset13 as ops

    return ov, ops


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def _low_bit(values: np.ndarray, kind: str) -> Any:
    """A u4 / i4 constant from one value per element (OpenVINO packs them two per byte)."""
    ov, ops = _ov()
    return ops.constant(np.ascontiguousarray(values), dtype=getattr(ov.Type, kind))


def _decompressed(qw: QuantizedWeight) -> Any:
    """The fp32 [N, K] weight as a decompression subgraph over the stored low-bit constants."""
    ov, ops = _ov()
    out, inp = qw.shape
    # the scales' own type: fp16, or fp32 where they are a k-quant's products, which fp16
    # would round
    f16 = ov.Type.f32 if qw.scales.dtype == torch.float32 else ov.Type.f16
    group = int(qw.scheme.group_size or inp)
    groups = inp // group
    shape = (out, groups, group)
    if qw.scheme.bits == 8:
        # i8 codes, or u8 ones (int8m)
        codes = ops.constant(np.ascontiguousarray(qw.qweight.cpu().numpy()).reshape(shape))
        scale = ops.constant(np.ascontiguousarray(qw.scales.cpu().numpy()).reshape(out, groups, 1))
        w = ops.multiply(ops.convert(codes, f16), scale)
        w = ops.reshape(w, ops.constant(np.array([out, inp], np.int64)), False)
        return ops.convert(w, ov.Type.f32)
    codes = unpack_int4(qw.qweight).cpu().numpy().reshape(shape)  # 0..15
    scale = ops.constant(np.ascontiguousarray(qw.scales.cpu().numpy()).reshape(out, groups, 1))
    # Q4_1's offsets are a term of their own. Float zero points z = -m/d (w = d·(q - z)) would
    # also be exact and spare that term while decoding, but the CPU plugin does not quantize
    # activations dynamically before weights with float zero points, so several-token passes
    # (prefill) lose its int8 kernels and slow down by more than decoding gains.
    if qw.scheme.offset:  # codes times scales
        w = ops.multiply(ops.convert(_low_bit(codes, "u4"), f16), scale)
    elif qw.zeros is None:  # symmetric: the zero-point is 8, so the codes are signed nibbles
        signed = _low_bit(codes.astype(np.int8) - 8, "i4")
        w = ops.multiply(ops.convert(signed, f16), scale)
    else:
        zeros = unpack_int4(qw.zeros).cpu().numpy()[:, :groups].reshape(out, groups, 1)
        unsigned, zp = _low_bit(codes, "u4"), _low_bit(zeros, "u4")
        w = ops.multiply(ops.subtract(ops.convert(unsigned, f16), ops.convert(zp, f16)), scale)
    w = ops.reshape(w, ops.constant(np.array([out, inp], np.int64)), False)
    return ops.convert(w, ov.Type.f32)


def _linear(x: Any, module: nn.Module, name: str) -> Any:
    _, ops = _ov()
    bias = getattr(module, "bias", None)
    if isinstance(module, QuantLinear):
        qw = module.quantized()
        y = _plus_offsets(x, ops.matmul(x, _decompressed(qw), False, True), qw)
    elif isinstance(module, LowRankLinear):
        h = ops.matmul(x, ops.constant(_f32(module.v)), False, True)
        y = ops.matmul(h, ops.constant(_f32(module.u)), False, True)
    elif isinstance(module, nn.Linear):
        y = ops.matmul(x, ops.constant(_f32(module.weight)), False, True)
    elif isinstance(module, nn.Sequential):  # quantized low-rank factors: one after the other
        for i, part in enumerate(module):
            x = _linear(x, part, f"{name}.{i}")
        return x
    else:
        raise InvalidArgumentError(f"{name}: cannot export a {type(module).__name__} to OpenVINO")
    return ops.add(y, ops.constant(_f32(bias))) if bias is not None else y


def _linears(x: Any, modules: tuple[nn.Module, ...], name: str) -> list[Any]:
    """Each module's output for the same input `x`: one matmul of their stacked rows, then a
    split, where they are stored alike (`stacked`); for a GGUF's Q4_1 blocks that is also one
    offsets term instead of one per module."""
    _, ops = _ov()
    whole = stacked(modules)
    if whole is None:
        return [_linear(x, m, f"{name}.{i}") for i, m in enumerate(modules)]
    widths = np.array([cast(nn.Linear, m).out_features for m in modules], np.int64)
    y = _linear(x, whole, name)
    return list(ops.variadic_split(y, np.int64(-1), widths).outputs())


def _plus_offsets(x: Any, y: Any, qw: QuantizedWeight) -> Any:
    """y + what float offsets per group add to x @ W^T: x's per-group sums [.., groups] times
    the offsets [groups, N] (nothing to add without offsets)."""
    if qw.offsets is None:
        return y
    _, ops = _ov()
    groups = qw.offsets.shape[1]
    split = ops.reshape(x, np.array([0, 0, groups, qw.shape[1] // groups], np.int64), True)
    sums = ops.reduce_sum(split, np.array([-1], np.int64), False)
    return ops.add(y, ops.matmul(sums, ops.constant(_f32(qw.offsets)), False, True))


def _rms_norm(x: Any, weight: torch.Tensor, eps: float) -> Any:
    _, ops = _ov()
    var = ops.reduce_mean(ops.power(x, np.float32(2)), np.array([-1], np.int64), True)
    inv = ops.divide(np.float32(1), ops.sqrt(ops.add(var, np.float32(eps))))
    return ops.multiply(ops.constant(_f32(weight)), ops.multiply(x, inv))


def _heads(x: Any, heads: int, dim: int) -> Any:
    """[1, S, heads*dim] -> [1, heads, S, dim]."""
    _, ops = _ov()
    x = ops.reshape(x, ops.constant(np.array([0, 0, heads, dim], np.int64)), True)
    return ops.transpose(x, ops.constant(np.array([0, 2, 1, 3], np.int32)))


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _rope(x: Any, cos: Any, sin: Any, dim: int) -> Any:
    """x * cos + rotate_half(x) * sin, in the shape of transformers' graph (the plugin fuses it)."""
    _, ops = _ov()
    half, end = dim // 2, int(np.iinfo(np.int64).max)
    x1 = ops.slice(x, _i64(0), _i64(half), _i64(1), _i64(3))
    x2 = ops.slice(x, _i64(half), _i64(end), _i64(1), _i64(3))
    rotated = ops.concat([ops.multiply(x2, np.float32(-1)), x1], -1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))


def _kv_state(new: Any, kv: int, dim: int, name: str, beam_idx: Any, sinks: list[Any]) -> Any:
    """Past positions (state) + the new ones; the concatenation is written back."""
    ov, ops = _ov()
    from openvino.op.util import Variable, VariableInfo

    info = VariableInfo()
    info.data_shape = ov.PartialShape([-1, kv, -1, dim])
    info.data_type = ov.Type.f32
    info.variable_id = name
    var = Variable(info)
    init = ops.constant(np.zeros((1, kv, 0, dim), np.float32))
    past = ops.gather(ops.read_value(init, var), beam_idx, np.int64(0))
    full = ops.concat([past, new], 2)
    sinks.append(ops.assign(full, var))
    return full


def _expand(kv_all: Any, kv: int, groups: int, dim: int) -> Any:
    """[1, kv, T, D] -> [1, kv*groups, T, D], each KV head repeated for its query heads
    (Unsqueeze -> bidirectional Broadcast -> Reshape: the plugin folds it into its KV cache)."""
    _, ops = _ov()
    if groups == 1:
        return kv_all
    x = ops.unsqueeze(kv_all, np.int64(2))  # [1, kv, 1, T, D]
    x = ops.broadcast(x, _i64(1, 1, groups, 1, 1), broadcast_spec="BIDIRECTIONAL")
    return ops.reshape(x, _i64(0, kv * groups, -1, dim), True)


def _attention(x: Any, block: Block, i: int, ctx: dict[str, Any], sinks: list[Any]) -> Any:
    _, ops = _ov()
    a = block.self_attn
    d, eps = a.head_dim, block.input_layernorm.eps
    cos, sin, mask = ctx[a.kind]
    q, k, v = _linears(x, (a.q_proj, a.k_proj, a.v_proj), f"layers.{i}.qkv")
    q, k, v = _heads(q, a.n_heads, d), _heads(k, a.n_kv, d), _heads(v, a.n_kv, d)
    if a.q_norm is not None and a.k_norm is not None:  # over each head's dim, before RoPE
        q, k = _rms_norm(q, a.q_norm.weight, eps), _rms_norm(k, a.k_norm.weight, eps)
    q, k = _rope(q, cos, sin, d), _rope(k, cos, sin, d)
    k_all = _kv_state(k, a.n_kv, d, f"past_key_values.{i}.key", ctx["beam_idx"], sinks)
    v_all = _kv_state(v, a.n_kv, d, f"past_key_values.{i}.value", ctx["beam_idx"], sinks)
    groups = a.n_heads // a.n_kv
    k_all, v_all = _expand(k_all, a.n_kv, groups, d), _expand(v_all, a.n_kv, groups, d)
    if a.softcap is None:
        out = ops.scaled_dot_product_attention(q, k_all, v_all, mask, np.float32(a.scale), False)
    else:  # soft-capped scores: the explicit form (SDPA has no cap)
        scores = ops.multiply(ops.matmul(q, k_all, False, True), np.float32(a.scale))
        scores = _soft_cap(scores, a.softcap)
        out = ops.matmul(ops.softmax(ops.add(scores, mask), -1), v_all, False, False)
    out = ops.transpose(out, ops.constant(np.array([0, 2, 1, 3], np.int64)))
    out = ops.reshape(out, ops.constant(np.array([0, 0, a.n_heads * d], np.int64)), True)
    return _linear(out, a.o_proj, f"layers.{i}.o")


def _soft_cap(x: Any, cap: float | None) -> Any:
    _, ops = _ov()
    if cap is None:
        return x
    return ops.multiply(ops.tanh(ops.divide(x, np.float32(cap))), np.float32(cap))


def _mlp(x: Any, block: Block, i: int) -> Any:
    _, ops = _ov()
    m = block.mlp
    gate, up = _linears(x, (m.gate_proj, m.up_proj), f"layers.{i}.gate_up")
    gate = ops.swish(gate) if m.act == "silu" else ops.gelu(gate, "tanh")
    return _linear(ops.multiply(gate, up), m.down_proj, f"layers.{i}.down")


def _embedding(model: Decoder, ids: Any) -> tuple[Any, Any]:
    """(embedded ids, the table's node when the LM head reads it too, else None)."""
    _, ops = _ov()
    emb = model.embed_tokens
    if isinstance(emb, QuantEmbedding):
        qw = emb.quantized()
        table = _decompressed(qw)
        tied = isinstance(model.lm_head, QuantLinear) and model.lm_head.qweight is emb.qweight
        if qw.offsets is not None:  # rows gathered, then each group's offset added
            groups, group = qw.offsets.shape[1], qw.shape[1] // qw.offsets.shape[1]
            rows = ops.gather(table, ids, np.int64(0))
            split = ops.reshape(rows, np.array([0, 0, groups, group], np.int64), True)
            offs = ops.gather(ops.constant(_f32(qw.offsets)), ids, np.int64(0))
            x = ops.add(split, ops.unsqueeze(offs, np.int64(-1)))
            x = ops.reshape(x, np.array([0, 0, groups * group], np.int64), True)
            return x, (table, qw) if tied else None
    elif isinstance(emb, nn.Embedding):
        table = ops.constant(_f32(emb.weight))
        tied = model.lm_head is emb or getattr(model.lm_head, "weight", None) is emb.weight
    else:
        raise InvalidArgumentError(f"cannot export an embedding of type {type(emb).__name__}")
    stored = emb.quantized() if isinstance(emb, QuantEmbedding) else None
    return ops.gather(table, ids, np.int64(0)), (table, stored) if tied else None


def _mask(model: Decoder, attention_mask: Any, position_ids: Any, kind: str) -> Any:
    """Float mask [1, 1, S, T]: 0 where key j is visible to the query at position p (j <= p,
    and inside the sliding window for a layer of that kind), -inf elsewhere."""
    _, ops = _ov()
    total = ops.gather(ops.shape_of(attention_mask), np.int64(1), np.int64(0))
    keys = ops.unsqueeze(ops.range(np.int64(0), total, np.int64(1), "i64"), np.int64(0))  # [1, T]
    pos = ops.unsqueeze(ops.squeeze(position_ids, np.int64(0)), np.int64(1))  # [S, 1]
    visible = ops.less_equal(keys, pos)
    window = model.spec.window_of(kind)
    if window:
        visible = ops.logical_and(visible, ops.greater(keys, ops.subtract(pos, np.int64(window))))
    mask = ops.select(visible, np.float32(0), np.float32(-np.inf))
    return ops.unsqueeze(mask, np.array([0, 1], np.int64))


def build_model(model: Decoder, max_context: int) -> Any:
    """The stateful OpenVINO model of `model` (rotary tables for `max_context` positions)."""
    ov, ops = _ov()
    spec = model.spec
    params = {
        "input_ids": ops.parameter([-1, -1], ov.Type.i64, name="input_ids"),
        "attention_mask": ops.parameter([-1, -1], ov.Type.i64, name="attention_mask"),
        "position_ids": ops.parameter([-1, -1], ov.Type.i64, name="position_ids"),
        "beam_idx": ops.parameter([-1], ov.Type.i32, name="beam_idx"),
        "logits_to_keep": ops.parameter([1], ov.Type.i64, name="logits_to_keep"),
    }
    ids_pos = params["position_ids"]
    ctx: dict[str, Any] = {"beam_idx": params["beam_idx"]}
    tables = {}  # one cos/sin pair per RoPE base, shared by the layer kinds that use it
    for kind in rope_kinds(spec):
        freqs, scale = rope_angles(spec, max_context, kind)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_context, D], the half-split layout
        tables[kind] = tuple(
            ops.unsqueeze(
                ops.gather(ops.constant((f(emb) * scale).numpy()), ids_pos, np.int64(0)),
                np.int64(1),
            )
            for f in (torch.cos, torch.sin)
        )
    for kind in set(spec.layer_kinds):
        cos, sin = tables.get(kind, tables["full"])
        ctx[kind] = (cos, sin, _mask(model, params["attention_mask"], ids_pos, kind))
    sinks: list[Any] = []
    x, table = _embedding(model, params["input_ids"])
    if spec.embed_scale is not None:
        x = ops.multiply(x, np.float32(spec.embed_scale))
    eps = spec.rms_norm_eps
    for i, block in enumerate(model.blocks):
        h = _attention(_rms_norm(x, block.input_layernorm.weight, eps), block, i, ctx, sinks)
        if (norm := block.attn_out_norm) is not None:
            h = _rms_norm(h, norm.weight, eps)
        x = ops.add(x, h)
        h = _mlp(_rms_norm(x, block.mlp_norm.weight, eps), block, i)
        if (norm := block.mlp_out_norm) is not None:
            h = _rms_norm(h, norm.weight, eps)
        x = ops.add(x, h)
    # the last logits_to_keep tokens of the pass: in PagedAttention's layout (OpenVINO's
    # rewrite for several rows: batch = the pass's tokens, one each) they lie along the batch
    # axis, so both layouts flatten to [1, tokens, hidden] first
    x = ops.reshape(x, _i64(1, -1, spec.hidden_size), False)
    start = ops.negative(params["logits_to_keep"])
    x = ops.slice(
        x,
        start,
        np.array([np.iinfo(np.int64).max], np.int64),
        np.array([1], np.int64),
        np.array([1], np.int64),
    )
    h = _rms_norm(x, model.norm.weight, spec.rms_norm_eps)
    if table is not None:
        shared, qw = table
        logits = ops.matmul(h, shared, False, True)
        if qw is not None:
            logits = _plus_offsets(h, logits, qw)
    else:
        logits = _linear(h, model.lm_head, "lm_head")
    logits = _soft_cap(logits, spec.final_softcap)
    logits.output(0).get_tensor().set_names({"logits"})
    result = ops.result(logits)
    return ov.Model([result], sinks, list(params.values()), "infopt")


def export_openvino(model: Decoder, path: str | Path, max_context: int) -> list[str]:
    """Write the IR: `path` (.xml) and its sibling BIN; returns both file names."""
    import openvino as ov

    path = Path(path)
    ov.save_model(build_model(model, max_context), str(path), compress_to_fp16=False)
    return [path.name, path.with_suffix(".bin").name]


def artifact(core: Decoder, max_context: int, prefix: str = "") -> Exported:
    """The manifest entry of the artifact and the writer of its files (under `prefix`)."""
    entry = {
        "files": [f"{prefix}{XML}", f"{prefix}{BIN}"],
        "format": "openvino-ir",
        "max_context": max_context,
        "kv_dtype": "the plan's (kv_cache.dtype), set when the CPU plugin compiles it",
        "requires": TARGET.installed_requirement(),
        "states": "past_key_values.%d.key / past_key_values.%d.value",
        # several slots: the runtime applies OpenVINO's SDPA-to-PagedAttention rewrite at load
        "batching": PAGED,
        "inputs": ["input_ids", "attention_mask", "position_ids", "beam_idx", "logits_to_keep"],
    }
    return entry, {f"{prefix}{XML}": lambda path: export_openvino(core, path, max_context)}
