"""Quantization storage and GPTQ on tiny layers."""

from __future__ import annotations

import pytest
import torch

from infopt.compress.gptq import Hessian, gptq_quantize
from infopt.core.quant import QuantLinear, QuantScheme, pack_int4, quantize_rtn, unpack_int4
from infopt.errors import InvalidArgumentError, ModelFormatError

SCHEMES = ["int8", "int4-g32", "int4s-g32", "int4-g64", "int4s-g16", "int8-g32", "int4m-g32"]


def test_int4_packing_round_trips_bit_exactly() -> None:
    codes = torch.randint(
        0, 16, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 0x21  # element 0 in the low nibble


@pytest.mark.parametrize("name", SCHEMES)
def test_rtn_codes_round_trip_and_error_is_bounded(name: str) -> None:
    scheme = QuantScheme.parse(name)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    qw = quantize_rtn(w, scheme)
    again = quantize_rtn(qw.dequantize(), scheme)  # a dequantized grid point re-quantizes to itself
    assert torch.equal(again.qweight, qw.qweight) and torch.equal(again.scales, qw.scales)
    step = qw.scales.float().repeat_interleave(scheme.group_size or 128, dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.5 + 1e-3).all()  # at most half a step off
    bits = qw.nbytes * 8 / w.numel()  # codes, and fp16 scales (zero-points, offsets) per group
    assert bits <= {8: 8.2, 4: 5.1}[scheme.bits] + (0.5 if scheme.name == "int8-g32" else 0)


@pytest.mark.parametrize("name", SCHEMES)
def test_safetensors_round_trip_is_bit_exact(tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    qw = quantize_rtn(torch.randn(16, 64), QuantScheme.parse(name))
    layer = QuantLinear(qw)
    save_file(
        {k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "l.safetensors"
    )
    loaded = load_file(tmp_path / "l.safetensors")
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype


def test_quant_linear_matches_dequantized_matmul() -> None:
    qw = quantize_rtn(torch.randn(32, 64), QuantScheme.parse("int4-g32"))
    x = torch.randn(3, 64)
    torch.testing.assert_close(QuantLinear(qw)(x), x @ qw.dequantize().T)


def layer_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    # correlated inputs with uneven scales: where GPTQ's error feedback pays off
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3
    x[:, :8] *= 6
    return w, x


@pytest.mark.parametrize("name", ["int4-g32", "int4s-g64", "int8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn(name: str, act_order: bool) -> None:
    w, x = layer_data()
    scheme = QuantScheme.parse(name)
    h = Hessian(128)
    for chunk in x.split(512):
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.double().T @ x.double() / len(x))
    rtn = quantize_rtn(w, scheme).dequantize()
    gptq = gptq_quantize(w, h.h, scheme, act_order=act_order, block_size=64).dequantize()
    err = lambda q: ((x @ (q - w).T) ** 2).mean().item()  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)


def test_bad_input_is_typed() -> None:
    with pytest.raises(InvalidArgumentError, match="group size 128 does not divide .* 576"):
        quantize_rtn(torch.randn(8, 576), QuantScheme.parse("int4-g128"))
    with pytest.raises(InvalidArgumentError, match="int3"):
        QuantScheme.parse("int3")
    with pytest.raises(InvalidArgumentError, match="power of two"):
        QuantScheme.parse("int4-g48")
    w = torch.randn(4, 32)
    w[2, 5] = float("nan")
    with pytest.raises(ModelFormatError, match=r"NaN/Inf \(first at index \[2, 5\]\)"):
        quantize_rtn(w, QuantScheme.parse("int8"))
    with pytest.raises(InvalidArgumentError, match="damp"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), QuantScheme.parse("int8"), damp=2.0)
    with pytest.raises(InvalidArgumentError, match="int4m-g32: GPTQ quantizes to integer grids"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), QuantScheme.parse("int4m-g32"))
    assert QuantScheme.parse("int8-g32").name == "int8-g32"
