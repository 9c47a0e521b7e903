"""Export the model core to ONNX, shaped for onnxruntime's fused CPU kernels.

The graph is written module by module from the (possibly compressed) model core, the way
onnxruntime-genai's model builder writes its own: every weight the core holds is carried over
as stored, never re-quantized.

- linears: `nn.Linear` -> MatMul (fp32); `QuantLinear` -> `MatMulNBits` (4-bit groups as stored;
  INT8 per-channel as 8-bit blocks sharing the row's scale, which is exact; INT8 groups as
  8-bit blocks); a float offset per group (`int4m`, `int8m`: a GGUF's Q4_1 / Q4_K, Q5_1 / Q5_K)
  is `MatMulNBits` with the codes centred on a zero point plus the input's per-block sums times
  the offsets, x·W = Σ_b d_b (x_b·q_b) +
  Σ_b m_b Σ x_b, exact in fp32; `LowRankLinear` -> two MatMuls. q/k/v are fused into one
  projection when they are stored alike.
- attention: `GroupQueryAttention` with rotary embedding, causal and sliding-window masks, and
  the KV cache in one buffer per layer and kind that is both `past` and `present` (bound to the
  same memory by the runtime, so nothing is copied per token).
- norms: `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (residual adds fused).
- embeddings: `Gather`, or `GatherBlockQuantized` on the quantized table that the tied LM head's
  `MatMulNBits` reads too (one copy of the bytes).

Graph interface (B rows, each with its own cache and position):
  inputs  input_ids int64 [B, S], seqlens_k int32 [B] (= each row's tokens cached after this
          call - 1), total_sequence_length int32 [] (= the largest seqlens_k + 1),
          logits_to_keep int64 [1],
          past_key_values.{i}.key / .value float32 [B, kv_heads, max_context, head_dim]
  outputs logits float32 [B, logits_to_keep, vocab], present.{i}.key / .value (same buffers)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from infopt.core.model import Block, Decoder, LowRankLinear, rope_angles, rope_kinds
from infopt.core.quant import QuantEmbedding, QuantizedWeight, QuantLinear, stacked, unpack_int4
from infopt.errors import InvalidArgumentError
from infopt.runtimes.base import Exported
from infopt.runtimes.onnxruntime import TARGET

OPSET = 21
MS = "com.microsoft"
FILE, DATA_FILE = "model.onnx", "model.onnx.data"
ACCURACY_LEVEL = 4  # MatMulNBits: activations quantized to int8 inside the kernel (fastest on CPU)
# Block size for INT8 per-channel weights (exact at any size), in order of preference: 32 runs
# the blocks' matrices fastest, 64 a wide LM head (its rows are long; tools/runtime_bench
# measures the whole model).
INT8_BLOCKS = (32, 64, 128, 16)
INT8_HEAD_BLOCKS = (64, 32, 128, 16)
# ops whose CPU kernels copy a constant weight into their own layout at session creation
PREPACKED = {"MatMulNBits", "MatMul", "Gemm"}


def onnx_io(model: Decoder) -> dict[str, Any]:
    """What an app needs to call the graph itself (recorded in the bundle manifest)."""
    return {
        "inputs": ["input_ids", "seqlens_k", "total_sequence_length", "logits_to_keep"],
        "past": "past_key_values.%d.key / past_key_values.%d.value",
        "present": "present.%d.key / present.%d.value",
        "kv_layout": "BNSH [batch, kv_heads, max_context, head_dim], past and present one buffer",
        "kv_heads": [b.self_attn.n_kv for b in model.blocks],
        "head_dim": model.spec.head_dim,
        "opset": OPSET,
    }


class _Graph:
    """Nodes and initializers of one graph, with fresh value names."""

    def __init__(self) -> None:
        import onnx

        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(
            self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
        )
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs: Any
    ) -> list[str]:
        domain = attrs.pop("domain", "")
        self.count += 1
        names = (
            [f"/{op_type}_{self.count}/out{i}" for i in range(outputs)]
            if isinstance(outputs, int)
            else list(outputs)
        )
        node = self.onnx.helper.make_node(
            op_type, list(inputs), names, name=f"{op_type}_{self.count}", domain=domain, **attrs
        )
        self.nodes.append(node)
        return names

    def one(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _nbits_weights(
    qw: QuantizedWeight, int8_blocks: tuple[int, ...] = INT8_BLOCKS
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(B [N, blocks, blob] uint8, scales [N, blocks] fp32, zero-points or None, block size) in
    MatMulNBits' layout, bit-exact with the stored weight."""
    out, inp = qw.shape
    if qw.scheme.group_size is not None and qw.scheme.group_size < 16:
        raise InvalidArgumentError(
            f"{qw.scheme.name}: onnxruntime's MatMulNBits needs groups of at least 16"
        )
    if qw.scheme.bits == 4:
        block = int(qw.scheme.group_size or 0)
        b = qw.qweight.cpu().numpy().reshape(out, inp // block, block // 2)
        scales = _f32(qw.scales)
        zeros = qw.zeros.cpu().numpy() if qw.zeros is not None else None  # [N, ceil(blocks/2)]
        if qw.scheme.offset:  # zero-points 0: the offsets come as a term of their own
            zeros = np.zeros((out, (inp // block + 1) // 2), np.uint8)
        return b, scales, zeros, block
    if qw.scheme.group_size:  # INT8 groups: one block each, its own scale
        block = qw.scheme.group_size
        if qw.scheme.offset:  # unsigned codes, zero points 0: the offsets come as a term
            codes = qw.qweight.cpu().numpy().astype(np.uint8)
            zeros8 = np.zeros((out, inp // block), np.uint8)
            return codes.reshape(out, inp // block, block), _f32(qw.scales), zeros8, block
        codes = (qw.qweight.cpu().numpy().astype(np.int16) + 128).astype(np.uint8)
        return codes.reshape(out, inp // block, block), _f32(qw.scales), None, block
    block = next((s for s in int8_blocks if inp % s == 0), 0)
    if not block:
        raise InvalidArgumentError(
            f"int8 layer with input size {inp}: onnxruntime's MatMulNBits needs a multiple of 16"
        )
    codes = (qw.qweight.cpu().numpy().astype(np.int16) + 128).astype(np.uint8)  # zero-point 128
    scales = np.repeat(_f32(qw.scales), inp // block, axis=1)  # [N, 1] -> [N, blocks]
    return codes.reshape(out, inp // block, block), scales, None, block


def _matmul_nbits(
    g: _Graph, x: str, qw: QuantizedWeight, name: str, bias: torch.Tensor | None
) -> str:
    b, scales, zeros, block = _nbits_weights(
        qw, INT8_HEAD_BLOCKS if name == "lm_head" else INT8_BLOCKS
    )
    offsets = None
    if qw.offsets is not None:
        zeros, offsets = _centred(qw, b, scales)
    inputs = [x, g.const(f"{name}.qweight", b), g.const(f"{name}.scales", scales)]
    inputs.append(g.const(f"{name}.zeros", zeros) if zeros is not None else "")
    if bias is not None:
        inputs += ["", g.const(f"{name}.bias", _f32(bias))]
    out, inp = qw.shape
    y = g.one(
        "MatMulNBits",
        inputs,
        domain=MS,
        K=inp,
        N=out,
        bits=qw.scheme.bits,
        block_size=block,
        accuracy_level=ACCURACY_LEVEL,
    )
    return _plus_offsets(g, x, y, qw, name, block, offsets)


def _centred(
    qw: QuantizedWeight, codes: np.ndarray, scales: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """(zero points, offsets) that give a weight with float offsets to MatMulNBits on centred
    codes: d*q + m = d*(q - c) + (m + c*d), c = 8 for 4-bit codes (the kernel's default zero
    point: None), else the middle of the codes used (16 for a GGUF's 5-bit Q5_1 / Q5_K ones, 128
    for a full byte). Exact up to one float32 rounding per group; with int8 activations (fast
    numerics) the activations' rounding error is multiplied by q - c instead of by q, whose
    mean is far from zero, and that error no longer drowns a greedy choice."""
    assert qw.offsets is not None
    if qw.scheme.bits == 4:
        return None, _f32(qw.offsets) + 8.0 * scales
    centre = 1 << max(int(codes.max()).bit_length() - 1, 0)
    return np.full(scales.shape, centre, np.uint8), _f32(qw.offsets) + centre * scales


def _plus_offsets(
    g: _Graph,
    x: str,
    y: str,
    qw: QuantizedWeight,
    name: str,
    block: int,
    offsets: np.ndarray | None = None,
) -> str:
    """y + what float offsets per block add to x @ W^T: x's per-block sums [.., K/block] times
    the offsets [K/block, N] (`offsets`, else the weight's own; nothing without them)."""
    if qw.offsets is None:
        return y
    if offsets is None:
        offsets = _f32(qw.offsets)
    blocks = qw.shape[1] // block
    split = g.one("Reshape", [x, g.const(f"{name}.blocks", np.array([0, 0, blocks, block]))])
    sums = g.one("ReduceSum", [split, g.const(f"{name}.sum_axis", np.array([-1]))], keepdims=0)
    term = g.one("MatMul", [sums, g.const(f"{name}.offsets_t", offsets.T)])
    return g.one("Add", [y, term])


def _matmul(g: _Graph, x: str, w: torch.Tensor, name: str, bias: torch.Tensor | None) -> str:
    """x @ w.T (+ bias) with a float weight [out, in]."""
    y = g.one("MatMul", [x, g.const(f"{name}.weight_t", _f32(w).T)])
    return g.one("Add", [y, g.const(f"{name}.bias", _f32(bias))]) if bias is not None else y


def _linear(g: _Graph, x: str, module: nn.Module, name: str) -> str:
    bias = getattr(module, "bias", None)
    if isinstance(module, QuantLinear):
        return _matmul_nbits(g, x, module.quantized(), name, bias)
    if isinstance(module, LowRankLinear):
        h = g.one("MatMul", [x, g.const(f"{name}.v_t", _f32(module.v).T)])
        return _matmul(g, h, module.u, f"{name}.u", bias)
    if isinstance(module, nn.Linear):
        return _matmul(g, x, module.weight, name, bias)
    if isinstance(module, nn.Sequential):  # quantized low-rank factors: one after the other
        for i, part in enumerate(module):
            x = _linear(g, x, part, f"{name}.{i}")
        return x
    raise InvalidArgumentError(f"{name}: cannot export a {type(module).__name__} to ONNX")


def _head_norm(g: _Graph, x: str, weight: torch.Tensor, heads: int, name: str, eps: float) -> str:
    """RMSNorm over each head's slice of x [B, S, heads * D] (QK-norm)."""
    d = weight.shape[0]
    split = g.one("Reshape", [x, g.const(f"{name}.heads", np.array([0, 0, heads, d]))])
    normed = g.one(
        "SimplifiedLayerNormalization",
        [split, g.const(name, _f32(weight))],
        epsilon=eps,
        axis=-1,
        stash_type=1,
    )
    return g.one("Reshape", [normed, g.const(f"{name}.flat", np.array([0, 0, heads * d]))])


def _attention(g: _Graph, x: str, block: Block, i: int, rope: tuple[str, str], window: int) -> str:
    a = block.self_attn
    fused = None if a.q_norm is not None else stacked((a.q_proj, a.k_proj, a.v_proj))
    if fused is not None:
        qkv = [_linear(g, x, fused, f"layers.{i}.attn.qkv_proj"), "", ""]
    else:
        qkv = [
            _linear(g, x, getattr(a, p), f"layers.{i}.attn.{p}")
            for p in ("q_proj", "k_proj", "v_proj")
        ]
    if a.q_norm is not None and a.k_norm is not None:  # before the rotary GQA applies
        eps = block.input_layernorm.eps
        qkv[0] = _head_norm(g, qkv[0], a.q_norm.weight, a.n_heads, f"layers.{i}.attn.q_norm", eps)
        qkv[1] = _head_norm(g, qkv[1], a.k_norm.weight, a.n_kv, f"layers.{i}.attn.k_norm", eps)
    extra = {} if a.softcap is None else {"softcap": float(a.softcap)}
    out = g.op(
        "GroupQueryAttention",
        [
            *qkv,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "seqlens_k",
            "total_sequence_length",
            *rope,
        ],
        [f"/layers.{i}/attn/out", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=a.n_heads,
        kv_num_heads=a.n_kv,
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=window,
        scale=float(a.scale),
        **extra,
    )[0]
    return _linear(g, out, a.o_proj, f"layers.{i}.attn.o_proj")


def _mlp(g: _Graph, x: str, block: Block, i: int) -> str:
    m = block.mlp
    fused = stacked((m.gate_proj, m.up_proj))
    if fused is not None:
        both = _linear(g, x, fused, f"layers.{i}.mlp.gate_up_proj")
        width = np.array([m.gate_proj.out_features, m.up_proj.out_features])
        gate, up = g.op("Split", [both, g.const(f"layers.{i}.mlp.split", width)], 2, axis=-1)
    else:
        gate = _linear(g, x, m.gate_proj, f"layers.{i}.mlp.gate_proj")
        up = _linear(g, x, m.up_proj, f"layers.{i}.mlp.up_proj")
    if m.act == "silu":
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate])])
    else:
        act = g.one("Gelu", [gate], approximate="tanh")
    return _linear(g, g.one("Mul", [act, up]), m.down_proj, f"layers.{i}.mlp.down_proj")


def _embedding(g: _Graph, model: Decoder) -> tuple[str, Any]:
    """The embedded input_ids, and how the LM head reuses the table (None: it has its own)."""
    emb = model.embed_tokens
    tied = model.lm_head is emb or (
        isinstance(model.lm_head, QuantLinear)
        and isinstance(emb, QuantEmbedding)
        and model.lm_head.qweight is emb.qweight
    )
    if isinstance(emb, QuantEmbedding):
        # The table stays in MatMulNBits' [V, blocks, blob] layout, the one copy both ops read;
        # the gather sees it as V rows of `blocks` blocks (small per-block scales/zeros apart).
        qw = emb.quantized()
        b, scales, zeros, block = _nbits_weights(qw, INT8_HEAD_BLOCKS)
        blocks = b.shape[1]
        data = g.const("embed_tokens.qweight", b)
        # the tied head's MatMulNBits reads the scales [V, blocks] (and zero points) as such;
        # an untied table's gather alone needs none of them in that shape
        scale = g.const("embed_tokens.scales", scales) if tied else ""
        inputs = [data, "input_ids", g.const("embed_tokens.row_scales", scales[..., None])]
        zp = ""
        if zeros is not None:  # 4-bit zero points two a byte, 8-bit ones a byte each
            # (a table with offsets gives the head centred zero points of its own)
            zp = g.const("embed_tokens.zeros", zeros) if tied and qw.offsets is None else ""
            codes = unpack_int4(torch.from_numpy(zeros)).numpy() if qw.scheme.bits == 4 else zeros
            row_zeros = codes[:, :blocks].astype(np.uint8)[..., None]
            inputs.append(g.const("embed_tokens.row_zeros", row_zeros))
        x = g.one(
            "GatherBlockQuantized",
            inputs,
            domain=MS,
            bits=qw.scheme.bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=2,
        )  # [1, S, blocks, block]
        if qw.offsets is not None:  # each row's blocks plus their offsets
            table = g.const("embed_tokens.offsets", _f32(qw.offsets))  # [V, blocks]
            row = g.one("Gather", [table, "input_ids"])  # [1, S, blocks]
            axis = g.const("embed_tokens.offset_axis", np.array([-1]))
            x = g.one("Add", [x, g.one("Unsqueeze", [row, axis])])
        x = g.one("Reshape", [x, g.const("embed_tokens.rows", np.array([0, -1, blocks * block]))])
        return x, ("nbits", data, scale, zp, qw, block) if tied else None
    if isinstance(emb, nn.Embedding):
        table = g.const("embed_tokens.weight", _f32(emb.weight))
        return g.one("Gather", [table, "input_ids"]), ("table", table) if tied else None
    raise InvalidArgumentError(f"cannot export an embedding of type {type(emb).__name__}")


def _lm_head(g: _Graph, h: str, model: Decoder, shared: Any) -> str:
    if shared is None:
        return _linear(g, h, model.lm_head, "lm_head")
    if shared[0] == "table":  # fp32 tied: logits = h @ table^T without a transposed copy
        spec = model.spec
        flat = g.one("Reshape", [h, g.const("lm_head.flat", np.array([-1, spec.hidden_size]))])
        logits = g.one("Gemm", [flat, shared[1]], transB=1)
        # [B * kept, vocab] -> [B, kept, vocab]: the kept count is the logits_to_keep input
        unflat = g.one(
            "Concat",
            [
                g.const("lm_head.batch", np.array([-1])),
                "logits_to_keep",
                g.const("lm_head.vocab", np.array([spec.vocab_size])),
            ],
            axis=0,
        )
        return g.one("Reshape", [logits, unflat])
    _, data, scale, zp, qw, block = shared
    offsets = None
    if qw.offsets is not None:  # centred as every other layer is (`_centred`)
        zeros, offsets = _centred(qw, qw.qweight.cpu().numpy(), _f32(qw.scales))
        zp = g.const("lm_head.zeros", zeros) if zeros is not None else ""
    out, inp = qw.shape
    logits = g.one(
        "MatMulNBits",
        [h, data, scale, zp],
        domain=MS,
        K=inp,
        N=out,
        bits=qw.scheme.bits,
        block_size=block,
        accuracy_level=ACCURACY_LEVEL,
    )
    return _plus_offsets(g, h, logits, qw, "lm_head", block, offsets)


def _norm(g: _Graph, x: str, weight: torch.Tensor, name: str, eps: float) -> str:
    return g.one(
        "SimplifiedLayerNormalization",
        [x, g.const(name, _f32(weight))],
        epsilon=eps,
        axis=-1,
        stash_type=1,
    )


def _skip_norm(
    g: _Graph, residual: str, x: str, weight: torch.Tensor, name: str, spec: Any
) -> tuple[str, str]:
    """(RMSNorm(residual + x), residual + x) in one fused op."""
    h, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization",
        [residual, x, g.const(name, _f32(weight))],
        4,
        domain=MS,
        epsilon=spec.rms_norm_eps,
    )
    return h, total


def build_graph(model: Decoder, max_context: int) -> Any:
    """The ONNX ModelProto of `model` with a KV cache of `max_context` positions."""
    from onnx import TensorProto, helper

    spec = model.spec
    g = _Graph()
    ropes = {}
    for kind in rope_kinds(spec):
        freqs, scale = rope_angles(spec, max_context, kind)
        suffix = "" if kind == "full" else "_local"
        ropes[kind] = (
            g.const(f"cos_cache{suffix}", (freqs.cos() * scale).numpy()),
            g.const(f"sin_cache{suffix}", (freqs.sin() * scale).numpy()),
        )
    x, shared = _embedding(g, model)
    if spec.embed_scale is not None:
        scale_value = np.array(spec.embed_scale, np.float32)
        x = g.one("Mul", [x, g.const("embed_scale", scale_value)])
    blocks = model.blocks
    eps = spec.rms_norm_eps
    h = g.one(
        "SimplifiedLayerNormalization",
        [x, g.const("layers.0.input_norm", _f32(blocks[0].input_layernorm.weight))],
        epsilon=eps,
        axis=-1,
        stash_type=1,
    )
    residual = x
    for i, block in enumerate(blocks):
        kind = block.self_attn.kind
        window = spec.window_of(kind) or -1
        attn = _attention(g, h, block, i, ropes.get(kind, ropes["full"]), window)
        if (out_norm := block.attn_out_norm) is not None:
            attn = _norm(g, attn, out_norm.weight, f"layers.{i}.post_attn_norm", eps)
        mlp_norm = block.mlp_norm.weight
        h, residual = _skip_norm(g, residual, attn, mlp_norm, f"layers.{i}.post_norm", spec)
        mlp = _mlp(g, h, block, i)
        if (out_norm := block.mlp_out_norm) is not None:
            mlp = _norm(g, mlp, out_norm.weight, f"layers.{i}.post_mlp_norm", eps)
        if i + 1 < len(blocks):
            norm, name = blocks[i + 1].input_layernorm.weight, f"layers.{i + 1}.input_norm"
        else:
            norm, name = model.norm.weight, "final_norm"
        h, residual = _skip_norm(g, residual, mlp, norm, name, spec)
    # only the last `logits_to_keep` positions reach the LM head (prefill needs one)
    start = g.one("Neg", ["logits_to_keep"])
    h = g.one(
        "Slice",
        [h, start, g.const("slice_end", np.array([1 << 62])), g.const("slice_axis", np.array([1]))],
    )
    logits = _lm_head(g, h, model, shared)
    if (cap := spec.final_softcap) is not None:
        cap_value = g.const("final_softcap", np.array(cap, np.float32))
        capped = g.one("Tanh", [g.one("Div", [logits, cap_value])])
        logits = g.one("Mul", [capped, cap_value])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    logits_shape: list[str | int | None] = ["batch", "logits_length", spec.vocab_size]
    outputs = [helper.make_tensor_value_info("logits", f32, logits_shape)]
    for i, block in enumerate(blocks):
        kv = block.self_attn.n_kv
        shape: list[str | int | None] = ["batch", kv, "max_context", spec.head_dim]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, shape))
    graph = helper.make_graph(g.nodes, "infopt", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="infopt",
    )
    proto.ir_version = 10
    return proto


def export_onnx(model: Decoder, path: str | Path, max_context: int) -> list[str]:
    """Write `model` as ONNX to `path` (graph) and `path`'s sibling DATA_FILE (weights, which
    onnxruntime maps into memory); returns both file names."""
    import onnx

    path = Path(path)
    proto = build_graph(model, max_context)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    proto = onnx.load_model(str(path), load_external_data=False)
    if one_initializer_per_consumer(proto.graph):
        onnx.save_model(proto, str(path))
    return [path.name, DATA_FILE]


def one_initializer_per_consumer(graph: Any) -> int:
    """Give each extra consumer of an external initializer its own initializer over the same
    bytes of the data file (the file is unchanged); returns how many were added.

    onnxruntime maps each external initializer on its own and releases one that a kernel has
    prepacked. A tied table read by both the embedding's gather and the LM head's matmul would
    otherwise stay mapped with every page resident (the matmul's prepacking read all of it)
    beside the packed copy (tests/integration/test_runtimes_real.py checks it is not). Split,
    the LM head's mapping goes after packing and the gather's keeps only the rows it has read.
    An fp32 tied table is written twice, the LM head's transposed for MatMul: reading one copy
    with a transB Gemm made the file smaller but the peak RSS larger in runtime_bench, growing
    as the gather looked rows up; kept as it is until that is understood."""
    external = {
        t.name: t
        for t in graph.initializer
        if t.data_location == t.EXTERNAL  # onnx.TensorProto.EXTERNAL
    }
    readers = Counter(name for node in graph.node for name in node.input)
    added = 0
    for node in graph.node:
        if node.op_type not in PREPACKED:
            continue
        for j, name in enumerate(node.input):
            if name not in external or readers[name] < 2:
                continue
            readers[name] -= 1
            added += 1
            alias = graph.initializer.add()
            alias.CopyFrom(external[name])
            alias.name = f"{name}.{node.name}"
            node.input[j] = alias.name
    return added


def artifact(core: Decoder, max_context: int, prefix: str = "") -> Exported:
    """The manifest entry of the artifact and the writer of its files (under `prefix`)."""
    entry = {
        "files": [f"{prefix}{FILE}", f"{prefix}{DATA_FILE}"],
        "format": "onnx",
        "max_context": max_context,
        "kv_dtype": "fp32",  # GroupQueryAttention's cache here is float32 whatever the plan
        "requires": TARGET.installed_requirement(),
        **onnx_io(core),
    }
    return entry, {f"{prefix}{FILE}": lambda path: export_onnx(core, path, max_context)}
