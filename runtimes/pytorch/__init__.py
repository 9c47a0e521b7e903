"""PyTorch: the model core itself, in eager mode, on the CPU or CUDA. Its artifact is an infopt
weight file (packed INT4/INT8 weights as stored). The reference every other target is checked
against, and where model files load unless told otherwise."""

from infopt.runtimes.registry import Target

TARGET = Target(
    kv_dtype="weights",  # the cache buffers take the model's float dtype
    # group-wise INT8 (a GGUF's Q8_0, Q5_0, Q5_1, Q5_K, Q6_K): kernels.DequantizedLinear
    float_schemes=("int8-g", "int8m-g"),
    title="PyTorch",
    extra="torch",
    requirement="torch>=2.4",
    reference=True,
    # measured on the CPU (docs/planner.md); the GPU figure is an estimate
    overhead={"cpu": 340e6, "gpu": 400e6},
    # tools/validate_planner on an AVX-512 machine of the CI kind (docs/planner.md)
    cpu_decode_efficiency={"fp32": 0.38, "int8": 0.25, "int4": 0.19},
    host_rank=2,
)
