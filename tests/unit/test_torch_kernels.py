"""The PyTorch runtime's packed kernels: every quantized form against the exact dequantized
layer, the model swap, and a bundle served on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import infopt
from infopt.compress.quantize import quantize_model
from infopt.core.model import Decoder, load_core
from infopt.core.quant import QuantLinear, quantize_rtn
from infopt.core.quant import QuantScheme as Scheme
from infopt.importers import open_model
from infopt.runtimes.pytorch.kernels import (
    DequantizedLinear,
    PackedInt4Linear,
    PackedInt8Linear,
    kernels_available,
    pack_model,
    packed_form,
)

FORMS = {
    "int8": PackedInt8Linear,
    "int4-g32": PackedInt4Linear,  # integer zero points
    "int4s-g32": PackedInt4Linear,  # GGUF Q4_0
    "int4m-g32": PackedInt4Linear,  # GGUF Q4_1: float offsets
    "int4-g64": PackedInt4Linear,
    "int8-g32": DequantizedLinear,  # GGUF Q8_0: no packed kernel takes group scales
}


# elsewhere (another CPU, an older torch) the model stays unpacked, which the rest cannot test
needs_kernels = pytest.mark.skipif(
    not kernels_available("cpu"), reason="this CPU or torch has no vectorized packed kernels"
)


def test_this_cpu_has_the_kernels() -> None:
    # machines of this project's kind (AVX2 or AVX-512, torch 2.13) have them
    assert kernels_available("cpu")
    assert not kernels_available("meta")


@needs_kernels
@pytest.mark.parametrize(("scheme", "form"), FORMS.items())
def test_each_packed_form_computes_the_dequantized_layer(scheme: str, form: type) -> None:
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(96, 128) * 0.05, Scheme.parse(scheme))
    bias = torch.randn(96) * 0.01
    exact = QuantLinear(qw, bias)
    assert packed_form(qw) is form
    packed = form(qw, bias)
    x = torch.randn(3, 5, 128)
    want, got = exact(x), packed(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = float((got - want).abs().max() / want.abs().max())
    if form is DequantizedLinear:
        assert err < 1e-6
    else:  # activations, scales and zero points in bfloat16 (8 significant bits)
        assert 0 < err < 2e-2


@needs_kernels
def test_shapes_the_int4_kernel_does_not_take_stay_exact() -> None:
    qw = quantize_rtn(torch.randn(40, 64), Scheme.parse("int4-g32"))  # 40 rows: not 16k
    assert packed_form(qw) is DequantizedLinear
    assert packed_form(quantize_rtn(torch.randn(32, 64), Scheme.parse("int4-g16"))) is (
        DequantizedLinear
    )


def _quantized_core(path: Path, weights: dict[str, str]) -> Decoder:
    core = load_core(open_model(path), 64, device=None)
    quantize_model(core, weights)
    return core


@needs_kernels
def test_pack_model_swaps_every_quantized_linear(tiny_gguf: Path) -> None:
    weights = {"embeddings": "int8", "lm_head": "int8", "attention": "int4-g32", "mlp": "int4m-g32"}
    exact, packed = _quantized_core(tiny_gguf, weights), _quantized_core(tiny_gguf, weights)
    counts = pack_model(packed)
    assert counts == {"PackedInt4Linear": 2 * 7, "PackedInt8Linear": 1}
    assert not any(isinstance(m, QuantLinear) for m in packed.modules())
    ids = torch.arange(1, 40)[None, :]
    pos = torch.arange(39)
    with torch.inference_mode():
        want = exact(ids, pos, 64)[0]
        got = packed(ids, pos, 64)[0]
    assert float((got - want).abs().max() / want.abs().max()) < 5e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert pack_model(load_core(open_model(tiny_gguf), 64, device=None)) == {}  # float: nothing


@needs_kernels
def test_a_quantized_bundle_serves_on_the_packed_kernels(tmp_path: Path, tiny_gguf: Path) -> None:
    from infopt.bundle.build import build

    out = tmp_path / "int4"
    build(tiny_gguf, out, device="host", runtime="pytorch", quantize="int4")
    served = infopt.load(out, max_context=64)
    assert served.runtime.kernels == {"PackedInt4Linear": 14, "PackedInt8Linear": 1}
    from infopt.bundle import open_bundle
    from infopt.runtimes.pytorch.runtime import from_bundle

    artifact = open_bundle(out).artifact("pytorch")
    exact = from_bundle(artifact, max_context=64, numerics="exact")
    assert exact.kernels == {}
    ids = list(range(1, 40))
    a, b = served.runtime.forward(ids), exact.forward(ids)
    assert np.abs(a - b).max() / np.abs(b).max() < 5e-2
