"""ONNX Runtime: a graph written for onnxruntime's fused CPU kernels (MatMulNBits for INT4/INT8
weights as stored, GroupQueryAttention over a KV cache bound in place)."""

from infopt.core.schema import COUNT, INTS, STR, STRS
from infopt.runtimes.registry import Target

TARGET = Target(
    title="ONNX Runtime",
    extra="onnx",
    requirement="onnxruntime>=1.32",
    # builds of the same runtime for other hardware, importing as `onnxruntime` too
    stand_ins=("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    build_modules=("onnx",),
    overhead={"cpu": 120e6, "gpu": 300e6},  # estimates
    # tools/validate_planner on an AVX-512 machine of the CI kind (docs/planner.md)
    cpu_decode_efficiency={"fp32": 0.96, "int8": 0.68, "int4": 0.60, "int4m": 0.45},
    kv_dtype="fp32",  # GroupQueryAttention's cache in the exported graph
    draft_rank=0,  # its INT4 kernels decode fastest on a CPU (docs/benchmarks.md)
    converts_files=True,
    host_rank=0,
    artifact_fields={
        "inputs": STRS,
        "past": STR,
        "present": STR,
        "kv_layout": STR,
        "kv_heads": INTS,
        "head_dim": COUNT,
        "opset": COUNT,
    },
)
