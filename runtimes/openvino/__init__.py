"""OpenVINO: a stateful IR (KV cache as model state, INT4/INT8 weights decompressed right before
each MatMul) on the CPU plugin, as OpenVINO's own LLM pipelines run; several slots run it
rewritten for PagedAttention, as OpenVINO GenAI's continuous batching does."""

from infopt.core.schema import STR, STRS
from infopt.runtimes.registry import Target

# an artifact's "batching" entry where its IR takes OpenVINO's SDPA-to-PagedAttention rewrite
# (several slots batched); IRs without it run their slots' requests one at a time
PAGED = "paged"

TARGET = Target(
    title="OpenVINO",
    extra="openvino",
    requirement="openvino>=2026.4",
    build_modules=("openvino",),
    overhead={"cpu": 180e6},  # an estimate
    # tools/validate_planner on an AVX-512 machine of the CI kind (docs/planner.md)
    cpu_decode_efficiency={"fp32": 0.75, "int8": 0.47, "int4": 0.35},
    draft_rank=1,
    converts_files=True,
    host_rank=1,
    artifact_fields={"states": STR, "inputs": STRS, "batching": STR},
)
