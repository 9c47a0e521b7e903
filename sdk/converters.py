"""What the fixed-shape exporters (LiteRT, Core ML) share: a float copy of a compressed model
core for their converters to trace."""

from __future__ import annotations

import copy

from torch import nn

from infopt.model import Decoder
from infopt.quant import QuantEmbedding, QuantLinear, QuantScheme


def float_copy(core: Decoder) -> tuple[Decoder, dict[str, QuantScheme]]:
    """A float32 copy of `core` (quantized layers dequantized) and the scheme of each layer that
    was quantized, by module name. The original is left untouched."""
    clone = copy.deepcopy(core).float()
    schemes: dict[str, QuantScheme] = {}
    for name, module in list(clone.named_modules()):
        if isinstance(module, QuantLinear | QuantEmbedding):
            schemes[name] = module.scheme
            weight = nn.Parameter(module.quantized().dequantize(), requires_grad=False)
            if isinstance(module, QuantEmbedding):
                plain: nn.Module = nn.Embedding(*module.shape)
            else:
                plain = nn.Linear(
                    module.in_features, module.out_features, bias=module.bias is not None
                )
                if module.bias is not None:
                    plain.bias = module.bias
            plain.weight = weight
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, attr, plain)
    if core.spec.tie_word_embeddings and "embed_tokens" in schemes:
        clone.tie_weights()
    return clone.eval(), schemes
