"""ONNX Runtime: the graph of `infopt.runtimes.onnxruntime.export` on onnxruntime's CPU kernels.

The KV cache lives in one preallocated buffer per layer and kind (one row per slot), bound with
I/O binding as both the `past` input and the `present` output of GroupQueryAttention, which
appends the new positions in place: no per-token allocation, no copy of the cache. Rows that
decode together run as one batch, each at its own position (GroupQueryAttention's
seqlens_k). Decode logits land in one reused buffer. Rewinding only moves the position (the
stale slots are masked, then overwritten). Loading a bundle needs onnxruntime, numpy and
tokenizers; no torch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from infopt.errors import BundleError, RuntimeNotAvailableError
from infopt.runtimes.base import Artifact, BaseRuntime, check_numerics, cpu_only, exportable_core

if TYPE_CHECKING:
    from infopt.importers import ModelSource


def session_options(threads: int | None) -> ort.SessionOptions:
    """Latency settings: one request at a time, all threads on each operator.

    The pool's threads spin between the operators of a run (waking them for each one would cost
    more than the operator), and stop spinning when the run returns: a speculative draft and its
    target run in turns, on this runtime or another, and threads left spinning would take the
    cores from the other (docs/benchmarks.md measures both)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


class ONNXRuntime(BaseRuntime):
    name = "onnxruntime"

    def __init__(
        self,
        session: ort.InferenceSession,
        max_context: int,
        vocab_size: int,
        batch_exact: bool = True,
        rows: int = 1,
    ) -> None:
        super().__init__(max_context, vocab_size, rows)
        # False where MatMulNBits quantizes activations to int8 (INT4/INT8 weights): a pass of
        # several tokens then rounds them unlike a one-token step, so speculative greedy output
        # can part from plain decoding
        self.batch_exact = batch_exact
        self.session = session
        # graphs exported before batching declare a batch of 1: their rows run one at a time
        self.batched = rows > 1 and not isinstance(session.get_inputs()[0].shape[0], int)
        # One buffer per layer and kind holds every row's cache; a row's pass binds a view of
        # its own row, a batched decode a view of the first n rows (so those are the rows that
        # decode together). Zeroed pages are only touched, hence resident, once used.
        self._caches: list[tuple[str, np.ndarray]] = []
        for meta in session.get_inputs():
            if meta.name.startswith("past_key_values."):
                shape = (rows, int(meta.shape[1]), max_context, int(meta.shape[3]))
                self._caches.append((meta.name, np.zeros(shape, np.float32)))
        self._row_bindings: dict[int, Any] = {}
        self._batch_bindings: dict[int, tuple[Any, np.ndarray, Any]] = {}
        self.binding = self._binding(0)
        self._logits = np.zeros((1, 1, vocab_size), np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)

    def _bind_caches(self, rows: slice) -> Any:
        """An I/O binding whose past and present are the views `rows` of every cache buffer."""
        binding = self.session.io_binding()
        for name, buf in self._caches:
            _, layer, kind = name.split(".")
            view = ort.OrtValue.ortvalue_from_numpy(buf[rows])
            binding.bind_ortvalue_input(name, view)
            binding.bind_ortvalue_output(f"present.{layer}.{kind}", view)
        return binding

    def _binding(self, row: int) -> Any:
        if row not in self._row_bindings:
            self._row_bindings[row] = self._bind_caches(slice(row, row + 1))
        return self._row_bindings[row]

    def _selected(self) -> None:
        self.binding = self._binding(self.row)

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        n, b = len(ids), self.binding
        total = self.position + n
        b.bind_cpu_input("input_ids", ids[None, :])
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        keep = 1 if only_last or n == 1 else n
        b.bind_cpu_input("logits_to_keep", np.array([keep], np.int64))
        if keep == 1:
            out, value = self._logits, self._logits_value
        else:
            out = np.empty((1, keep, self.vocab_size), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(out)
        b.bind_ortvalue_output("logits", value)
        self.session.run_with_iobinding(b)
        self.position = total
        return out[0].copy() if keep == 1 else out[0]

    def _decode_batch(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if n not in self._batch_bindings:
            logits = np.zeros((n, 1, self.vocab_size), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(logits)
            self._batch_bindings[n] = (self._bind_caches(slice(0, n)), logits, value)
        b, logits, value = self._batch_bindings[n]
        cached = np.array(self.positions[:n], np.int32)  # each row's new token goes here
        b.bind_cpu_input("input_ids", ids[:, None])
        b.bind_cpu_input("seqlens_k", cached)
        b.bind_cpu_input("total_sequence_length", np.array(int(cached.max()) + 1, np.int32))
        b.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        b.bind_ortvalue_output("logits", value)
        self.session.run_with_iobinding(b)
        return logits[:, 0].copy()

    def _swap_rows(self, a: int, b: int, used: int) -> None:
        for _, buf in self._caches:
            held = buf[a, :, :used].copy()
            buf[a, :, :used] = buf[b, :, :used]
            buf[b, :, :used] = held


def load_session(
    path: Path, threads: int | None, numerics: str = "fast", quantized: bool = True
) -> ort.InferenceSession:
    """A session of the graph at `path`; with numerics "exact", every MatMulNBits of a
    `quantized` graph computes with float32 activations whatever accuracy level the graph was
    exported with (`_fp32_activations`)."""
    options = session_options(threads)
    graph: str | bytes = str(path)
    exact = None
    if check_numerics(numerics) == "exact" and quantized:
        exact = _fp32_activations(path)
    if exact is not None:
        graph = exact
        # the graph comes as bytes; its weights stay in the external data file beside it
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.parent)
        )
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped exceptions on bad graphs
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from e


def _fp32_activations(path: Path) -> bytes | None:
    """The graph (without its external weights) with float32 activations in every MatMulNBits:
    accuracy level 0 on 4-bit ones; 8-bit ones, which MLAS computes fast only with int8
    activations, become a float32 MatMul on their weights dequantized once (by the session's
    constant folding, when it loads: exact costs four bytes a weight there). None when no
    node needs a change."""
    try:
        import onnx
    except ImportError:
        raise RuntimeNotAvailableError(
            "numerics='exact' on ONNX Runtime rewrites the graph with the onnx package: "
            "pip install 'infopt[onnx]'"
        ) from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others on damaged files
        raise BundleError(f"{path}: not a readable ONNX graph ({e})") from e
    changed = False
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        sizes = [attrs.get(k) for k in ("K", "N", "bits", "block_size")]
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            raise BundleError(
                f"{path}: MatMulNBits node {node.name!r} lacks K, N, bits or block_size"
            )
        if len(node.input) > 4 and node.input[4]:
            raise BundleError(
                f"{path}: MatMulNBits node {node.name!r} has a g_idx input, which infopt's "
                "exporter never writes; numerics='exact' cannot rewrite it"
            )
        if attrs["bits"] == 8 and attrs["K"] % attrs["block_size"] == 0:
            nodes += _dequantized_matmul(node, attrs, onnx)
            changed = True
            continue
        for attribute in node.attribute:
            if attribute.name == "accuracy_level" and attribute.i != 0:
                attribute.i = 0
                changed = True
        nodes.append(node)
    if not changed:
        return None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def _dequantized_matmul(node: Any, attrs: dict[str, Any], onnx: Any) -> list[Any]:
    """Nodes computing an 8-bit MatMulNBits as `A @ ((B - zero point) * scale)^T` in float32:
    B [N, blocks, block] uint8, scales [N * blocks], zero points [N, blocks] uint8 or 128."""
    helper, n, k = onnx.helper, attrs["N"], attrs["K"]
    blocks = k // attrs["block_size"]
    inputs = list(node.input) + [""] * (6 - len(node.input))
    a, b, scales, zeros, _g_idx, bias = inputs[:6]
    p = f"{node.name or node.output[0]}.exact"
    out: list[Any] = []

    def const(name: str, value: Any) -> str:
        out.append(helper.make_node("Constant", [], [f"{p}.{name}"], value=value))
        return f"{p}.{name}"

    def one(op: str, ins: list[str], name: str, **kw: Any) -> str:
        out.append(helper.make_node(op, ins, [f"{p}.{name}"], **kw))
        return f"{p}.{name}"

    grid = const("grid", helper.make_tensor("grid", onnx.TensorProto.INT64, [3], [n, blocks, 1]))
    codes = one("Cast", [b], "codes", to=onnx.TensorProto.FLOAT)
    if zeros:
        zero = one("Reshape", [one("Cast", [zeros], "zf", to=onnx.TensorProto.FLOAT), grid], "z")
    else:
        zero = const("z", helper.make_tensor("z", onnx.TensorProto.FLOAT, [], [128.0]))
    scale = one("Reshape", [scales, grid], "s")
    weight = one("Mul", [one("Sub", [codes, zero], "centred"), scale], "w3")
    shape = const("nk", helper.make_tensor("nk", onnx.TensorProto.INT64, [2], [n, k]))
    transposed = one("Transpose", [one("Reshape", [weight, shape], "w")], "wt", perm=[1, 0])
    product = node.output[0] if not bias else f"{p}.y"
    out.append(helper.make_node("MatMul", [a, transposed], [product]))
    if bias:
        out.append(helper.make_node("Add", [product, bias], [node.output[0]]))
    return out


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> ONNXRuntime:
    """The session of a verified bundle's ONNX artifact (`numerics`: `load_session`'s), with
    `slots` KV states."""
    cpu_only("onnxruntime", device)
    artifact.check_context(max_context, "ONNX graph (its rotary tables)")
    session = load_session(artifact.file(), threads, numerics, artifact.quantized)
    exact = numerics == "exact" or not artifact.quantized
    rt = ONNXRuntime(session, max_context, artifact.vocab_size, batch_exact=exact, rows=slots)
    rt.numerics = numerics
    return rt


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> ONNXRuntime:
    """Export an imported model (needs torch) to a temporary ONNX file and load it."""
    cpu_only("onnxruntime", device)
    core = exportable_core(source, "onnxruntime", max_context, dtype)
    return from_model(
        core, max_context=max_context, threads=threads, numerics=numerics, slots=slots
    )


def from_model(
    core: Any,
    *,
    max_context: int,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> ONNXRuntime:
    """Export a model core (as compressed, if it is) and load it on onnxruntime."""
    from infopt.core.quant import QuantStorage
    from infopt.runtimes.onnxruntime.export import FILE, export_onnx

    quantized = any(isinstance(m, QuantStorage) for m in core.modules())
    with tempfile.TemporaryDirectory(prefix="infopt-onnx-") as tmp:
        export_onnx(core, Path(tmp) / FILE, max_context)
        session = load_session(Path(tmp) / FILE, threads, numerics, quantized)
    exact = numerics == "exact" or not quantized
    rt = ONNXRuntime(session, max_context, core.spec.vocab_size, batch_exact=exact, rows=slots)
    rt.numerics = numerics
    return rt
