"""The registry of targets: one folder per target under `runtimes/`, whose `__init__.py` holds a
`TARGET` record (this module's `Target`) and nothing heavy; `runtime.py` (the runtime),
`export.py` (the exporter: `artifact(core, max_context, prefix)`) and, for targets whose package
can be read back, `check.py` sit beside it. Every per-target list in infopt is derived from
these records. Importing this module, or any record, needs neither torch nor a runtime package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
import importlib.util
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from infopt.errors import BundleError, RuntimeNotAvailableError

Rows = list[tuple[str, str]]
PARTS = ("runtime", "export", "check")


def _no_rows(_artifact: Mapping[str, Any]) -> Rows:
    return []


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Target:
    """What infopt knows about one target without importing its package."""

    title: str  # how messages name it
    extra: str  # the pip extra that installs it: pip install 'infopt[extra]'
    requirement: str  # the distribution its runtime imports and the range tested, as pip says it
    name: str = ""  # its folder's name, the manifest's runtime name (the registry sets it)
    stand_ins: tuple[str, ...] = ()  # distributions that may replace `package` (own versions)
    # what building its artifact imports beyond torch, and the pip extra installing that (if not
    # `extra`)
    build_modules: tuple[str, ...] = ()
    build_extra: str = ""
    symmetric_int4: bool = False  # its INT4 weights carry no zero points
    fixed_windows: bool = False  # compiled for a few fixed token windows, padded to them
    # where it has numerics="exact": "all" artifacts, "float" ones only, or "none"
    exact_numerics: str = "all"
    reference: bool = False  # runs the model core itself (on CUDA, model files load on it)
    # model files load on it through a cached conversion that keeps a GGUF's blocks as they are
    converts_files: bool = False
    # resident memory with no model loaded, by device kind (the planner's overhead)
    overhead: Mapping[str, float] = field(default_factory=dict)
    # achieved fraction of a CPU's copy bandwidth while decoding, by how the blocks are stored
    # ("fp32", "fp16", "int8", "int4", "int4m": INT4 with a GGUF's Q4_1 offsets, else its
    # "int4"), from tools/validate_planner on this project's machine kind (docs/planner.md);
    # the device profile's own figure stands in for a storage without one
    cpu_decode_efficiency: Mapping[str, float] = field(default_factory=dict)
    # the precision its KV cache is held in whatever the plan asks ("weights": the model's float
    # dtype, fp32 where any group is quantized); None: the plan's own (kv_cache.dtype)
    kv_dtype: str | None = None
    # weight schemes (prefixes) it holds dequantized to float32 on a CPU, having no kernel of
    # its own for them: priced at four bytes a weight
    float_schemes: tuple[str, ...] = ()
    draft_rank: int | None = None  # on a CPU, a bundle's INT4 draft prefers the lowest rank
    host_rank: int | None = None  # its place in the `host` profile's runtimes (None: absent)
    reads_back: bool = False  # `check.check_package` reads its artifact back on `verify`
    runs_here: Callable[[], bool] = _always  # whether it can compute on this machine
    describe: Callable[[Mapping[str, Any]], Rows] = _no_rows  # inspect's rows for its artifact
    # JSON Schema properties of its manifest artifact entry beyond every artifact's own (files,
    # format, requires, max_context, kv_dtype), and which of them must be there
    artifact_fields: Mapping[str, Any] = field(default_factory=dict)
    artifact_required: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        return re.split(r"[<>=!~]", self.requirement, maxsplit=1)[0].strip()

    @property
    def versions(self) -> str:
        return self.requirement[len(self.package) :].strip()

    def module(self, part: str) -> ModuleType:
        """`runtime`, `export` or `check` of this target; a missing package is a typed error
        naming the pip extra."""
        if part not in PARTS:
            raise ValueError(f"part {part!r}: expected one of {PARTS}")
        try:
            return importlib.import_module(f"{__package__}.{self.name}.{part}")
        except ImportError as e:
            if (e.name or "").startswith("infopt."):
                raise
            raise RuntimeNotAvailableError(
                f"runtime {self.name!r} ({self.title}) needs a package that is not installed "
                f"({e}); install it with: pip install 'infopt[{self.extra}]'"
            ) from e

    def check_buildable(self) -> None:
        """Refuse, before any work, a build whose exporter's packages are missing, naming the
        pip extra."""
        missing = [m for m in self.build_modules if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeNotAvailableError(
                f"building the {self.title} artifact ({self.name}) needs {', '.join(missing)}, "
                f"which {'is' if len(missing) == 1 else 'are'} not installed; install it with: "
                f"pip install 'infopt[{self.build_extra or self.extra}]'"
            )

    def buildable(self) -> bool:
        """Whether its exporter's packages are installed (without importing them)."""
        return all(importlib.util.find_spec(m) is not None for m in self.build_modules)

    def installed(self) -> bool:
        """Whether `package` (or a stand-in) is installed, without importing it."""
        return any(_installed(p) for p in (self.package, *self.stand_ins))

    def installed_requirement(self) -> dict[str, str]:
        """What a bundle built here records: the package, and a floor at its installed
        major.minor version ("" when it is not installed)."""
        try:
            major, minor = metadata.version(self.package).split(".")[:2]
            return {"package": self.package, "version": f">={major}.{minor.split('+')[0]}"}
        except (metadata.PackageNotFoundError, ValueError):
            return {"package": self.package, "version": ""}

    def check_requirement(self, bundle: str, requires: Mapping[str, str] | None) -> None:
        """Refuse an artifact built for another version range of its package: `BundleError`;
        the package missing: `RuntimeNotAvailableError` naming the pip extra."""
        if not requires or not requires.get("version"):
            return
        package = requires["package"]
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            if any(_installed(p) for p in self.stand_ins if p != package):
                return
            raise RuntimeNotAvailableError(
                f"{bundle}: runtime {self.name!r} needs {package}{requires['version']}, which "
                f"is not installed; install it with: pip install 'infopt[{self.extra}]'"
            ) from None
        if not satisfies(have, requires["version"]):
            raise BundleError(
                f"{bundle}: its {self.name} artifact was built for {package}"
                f"{requires['version']}, and this environment has {package} {have}; install a "
                f"matching {package} or rebuild the bundle here"
            )


@functools.cache
def targets() -> dict[str, Target]:
    """Every target shipped (installed or not), by name, in name order."""
    package = importlib.import_module(__package__)
    found: dict[str, Target] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            record = importlib.import_module(f"{__package__}.{info.name}").TARGET
            assert isinstance(record, Target) and record.name in ("", info.name), info.name
            found[info.name] = replace(record, name=info.name)
    return dict(sorted(found.items()))


def names() -> list[str]:
    return list(targets())


def target(name: str) -> Target:
    """The record of `name`; `RuntimeNotAvailableError` listing the known ones otherwise."""
    known = targets()
    if name not in known:
        raise RuntimeNotAvailableError(f"unknown runtime {name!r}; available: {list(known)}")
    return known[name]


def reference() -> Target:
    """The target that runs a model core itself (model files load on it by default)."""
    return next(t for t in targets().values() if t.reference)


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def satisfies(installed: str, spec: str) -> bool:
    """Whether `installed` meets `spec`: comma-separated `>=X.Y` / `<X.Y` / `==X.Y` clauses."""
    have = _version_tuple(installed)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = re.match(r"(>=|<=|==|<|>)", clause)
        if op is None:
            raise BundleError(f"version requirement {spec!r}: cannot read clause {clause!r}")
        want = _version_tuple(clause[op.end() :])
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "<": a < b, ">": a > b}[op.group(1)]
        if not ok:
            return False
    return True


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True
