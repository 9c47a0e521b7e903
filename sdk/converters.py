"""What the fixed-shape exporters (LiteRT, Core ML) share: a float copy of a compressed model
core for their converters to trace, and a guard that keeps the converters' own printing (progress
bars, native logs) off the process's stdout and stderr."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

from torch import nn

from infopt.model import Decoder
from infopt.quant import QuantEmbedding, QuantLinear, QuantScheme

CONVERTER_LOGGERS = ("coremltools", "absl", "litert_torch", "ai_edge_quantizer")


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


@contextlib.contextmanager
def quiet_converter(name: str) -> Iterator[None]:
    """Run a converter with file descriptors 1 and 2 sent to a temporary file: litert-torch and
    coremltools print progress bars and native (C++) logs there, which would garble a build's
    progress display and `--json` output. On an error, the tail of what it printed is added to
    the exception's notes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    levels = {n: logging.getLogger(n).level for n in CONVERTER_LOGGERS}
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            for n in CONVERTER_LOGGERS:
                logging.getLogger(n).setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except BaseException as e:
            sys.stdout.flush()
            sys.stderr.flush()
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", "replace").strip()
            if tail:
                e.add_note(f"{name} printed:\n{tail}")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
