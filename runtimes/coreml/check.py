"""A Core ML package read back from the file alone (no prediction: works on every platform,
without torch), and checked against what a bundle's manifest tells an app."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from infopt.errors import BundleError
from infopt.runtimes.coreml.runtime import ct


def read_package(path: str | Path) -> dict[str, Any]:
    """Inputs, outputs, states, op counts and quantized weights of a saved .mlpackage, read from
    the file alone (no prediction: works on every platform, without torch)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    array_type = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        except Exception as e:  # coremltools raises plain exceptions on unreadable packages
            raise BundleError(f"{path}: coremltools cannot read this package ({e})") from e
        spec = mlmodel.get_spec()
        program = milproto_load(
            spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
        )
    d = spec.description
    weights = {}
    ops: dict[str, int] = {}
    for op in program.functions["main"].operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.data.val, op.scale.val
            weights[re.sub(r"(_quantized)?$", "", op.outputs[0].name, count=1)] = {
                "dtype": types.builtin_to_string(op.data.dtype),
                "codes": data,
                "scales": scale,
                "block": data.shape[1] // scale.shape[1],
                "offset": op.offset is not None,
            }
    return {
        "inputs": {
            f.name: {
                "dtype": array_type(f.type.multiArrayType.dataType),
                "shapes": [list(s.shape) for s in f.type.multiArrayType.enumeratedShapes.shapes]
                or [list(f.type.multiArrayType.shape)],
            }
            for f in d.input
        },
        "outputs": [f.name for f in d.output],
        "states": {
            f.name: {
                "shape": list(f.type.stateType.arrayType.shape),
                "dtype": array_type(f.type.stateType.arrayType.dataType),
            }
            for f in d.state
        },
        "ops": ops,
        "weights": weights,
    }


def check_package(root: Path, artifact: dict[str, Any]) -> dict[str, Any]:
    """A bundle's .mlpackage read back against what its manifest tells an app (inputs, windows,
    outputs, states): a `BundleError` naming each mismatch; else a summary (ops, weight dtypes)."""
    found = read_package(root / artifact["package"])
    windows = [int(w) for w in artifact["windows"]]
    length = int(artifact["states"]["k_cache"][2])
    expected = {
        "inputs": sorted(artifact["inputs"]),
        "input_ids shapes": [[1, w] for w in windows],
        "causal_mask shapes": [[1, 1, w, length] for w in windows],
        "outputs": ["logits"],
        "states": {n: {"shape": s, "dtype": "FLOAT16"} for n, s in artifact["states"].items()},
    }
    inputs = found["inputs"]
    actual = {
        "inputs": sorted(inputs),
        "input_ids shapes": inputs.get("input_ids", {}).get("shapes"),
        "causal_mask shapes": inputs.get("causal_mask", {}).get("shapes"),
        "outputs": found["outputs"],
        "states": found["states"],
    }
    wrong = [
        f"{k}: package {actual[k]}, manifest {v}" for k, v in expected.items() if actual[k] != v
    ]
    if wrong:
        raise BundleError(f"{root / artifact['package']} does not match the manifest: {wrong}")
    dtypes: dict[str, int] = {}
    for w in found["weights"].values():
        dtypes[w["dtype"]] = dtypes.get(w["dtype"], 0) + 1
    return {
        "package": artifact["package"],
        "windows": windows,
        "states": sorted(found["states"]),
        "attention_ops": found["ops"].get("scaled_dot_product_attention", 0),
        "quantized_weights": dtypes,
    }
