"""Device profiles: one TOML file per device, validated on load, plus `host` detected live.

Figures carry their units as strings ("80 GB", "2039 GB/s", "312 TFLOPS") so a wrong unit is
caught, and every figure names its source. A user profile is any TOML file of the same schema.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from infopt.errors import ProfileError
from infopt.runtimes.registry import names

SCHEMA = 1
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "int4")
WEIGHT_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
KINDS = ("gpu", "cpu", "npu")
_BYTES = {
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_RATE = {"GB/s": 1e9, "TB/s": 1e12, "MB/s": 1e6}
_OPS = {"GFLOPS": 1e9, "TFLOPS": 1e12, "GOPS": 1e9, "TOPS": 1e12}
REQUIRED = {
    "schema",
    "name",
    "description",
    "kind",
    "memory",
    "usable_memory",
    "bandwidth",
    "peak_compute",
    "weight_precisions",
    "compute_precisions",
    "runtimes",
    "static_shapes",
    "efficiency",
    "sources",
}
OPTIONAL = {"cpu_flags", "cores"}
SOURCED = ("memory", "usable_memory", "bandwidth", "peak_compute", "efficiency")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # gpu | cpu | npu
    memory_bytes: float  # physical memory
    usable_bytes: float  # what one process/app may really allocate
    bandwidth: float  # bytes/s, peak
    peak_compute: dict[str, float]  # precision -> FLOP/s (or OP/s for int)
    weight_precisions: tuple[str, ...]
    compute_precisions: tuple[str, ...]
    runtimes: tuple[str, ...]  # preferred first
    static_shapes: bool
    decode_efficiency: float  # achieved fraction of `bandwidth` in decode
    prefill_efficiency: float  # achieved fraction of peak compute in prefill
    sources: dict[str, str]
    cpu_flags: tuple[str, ...] = ()
    cores: int | None = None
    path: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantity(value: Any, units: dict[str, float], where: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]+)\s*", str(value))
    if not match or match.group(2) not in units or float(match.group(1)) <= 0:
        raise ProfileError(
            f"{where} = {value!r}: expected a positive number with a unit, one "
            f"of {sorted(units)} (for example '80 {next(iter(units))}')"
        )
    return float(match.group(1)) * units[match.group(2)]


def _names(value: Any, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in allowed for v in value):
        raise ProfileError(f"{where} = {value!r}: expected a non-empty list from {list(allowed)}")
    return tuple(value)


def parse_profile(data: dict[str, Any], origin: str) -> DeviceProfile:
    """A DeviceProfile from parsed TOML, with a typed error naming `origin` and the bad key."""
    keys = set(data)
    if missing := sorted(REQUIRED - keys):
        raise ProfileError(f"{origin}: missing key(s) {missing}")
    if unknown := sorted(keys - REQUIRED - OPTIONAL):
        raise ProfileError(
            f"{origin}: unknown key(s) {unknown}; allowed: {sorted(REQUIRED | OPTIONAL)}"
        )
    if data["schema"] != SCHEMA:
        raise ProfileError(f"{origin}: schema = {data['schema']!r}, this infopt reads {SCHEMA}")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{origin}: kind = {data['kind']!r}, expected one of {list(KINDS)}")
    compute = data["peak_compute"]
    if not isinstance(compute, dict) or not compute:
        raise ProfileError(f"{origin}: peak_compute must be a table of precision = 'N TFLOPS'")
    peak = {}
    for precision, value in compute.items():
        if precision not in PRECISIONS:
            raise ProfileError(
                f"{origin}: peak_compute.{precision}: unknown precision; "
                f"expected one of {list(PRECISIONS)}"
            )
        peak[precision] = _quantity(value, _OPS, f"{origin}: peak_compute.{precision}")
    eff = data["efficiency"]
    if (
        not isinstance(eff, dict)
        or set(eff) != {"decode", "prefill"}
        or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in eff.values())
    ):
        raise ProfileError(
            f"{origin}: efficiency = {eff!r}: expected "
            "{{decode = x, prefill = y}} with 0 < x, y <= 1"
        )
    sources = data["sources"]
    if not isinstance(sources, dict) or (missing := [k for k in SOURCED if not sources.get(k)]):
        raise ProfileError(
            f"{origin}: sources must name where every figure comes from; "
            f"missing sources.{missing if isinstance(sources, dict) else SOURCED}"
        )
    compute_precisions = _names(
        data["compute_precisions"], PRECISIONS, f"{origin}: compute_precisions"
    )
    if unpeaked := sorted(set(compute_precisions) - set(peak)):
        raise ProfileError(f"{origin}: compute_precisions {unpeaked} have no peak_compute figure")
    memory = _quantity(data["memory"], _BYTES, f"{origin}: memory")
    usable = _quantity(data["usable_memory"], _BYTES, f"{origin}: usable_memory")
    if usable > memory:
        raise ProfileError(
            f"{origin}: usable_memory {data['usable_memory']!r} exceeds memory {data['memory']!r}"
        )
    if not isinstance(data["static_shapes"], bool):
        raise ProfileError(
            f"{origin}: static_shapes = {data['static_shapes']!r}: expected true or false"
        )
    return DeviceProfile(
        name=str(data["name"]),
        description=str(data["description"]),
        kind=data["kind"],
        memory_bytes=memory,
        usable_bytes=usable,
        bandwidth=_quantity(data["bandwidth"], _RATE, f"{origin}: bandwidth"),
        peak_compute=peak,
        weight_precisions=_names(
            data["weight_precisions"], WEIGHT_PRECISIONS, f"{origin}: weight_precisions"
        ),
        compute_precisions=compute_precisions,
        runtimes=_names(data["runtimes"], tuple(names()), f"{origin}: runtimes"),
        static_shapes=data["static_shapes"],
        decode_efficiency=float(eff["decode"]),
        prefill_efficiency=float(eff["prefill"]),
        sources={str(k): str(v) for k, v in sources.items()},
        cpu_flags=tuple(data.get("cpu_flags", ())),
        cores=data.get("cores"),
        path=origin,
    )


def builtin_names() -> list[str]:
    files = resources.files(__name__).iterdir()
    return sorted([f.name[:-5] for f in files if f.name.endswith(".toml")] + ["host"])


def load_profile(name_or_path: str | Path, *, measure_bandwidth: bool = False) -> DeviceProfile:
    """A built-in profile by name (`infopt-pack devices` lists them), `host`, or a TOML file."""
    if str(name_or_path) == "host":
        from infopt.device_profiles.host import host_profile

        return host_profile(measure_bandwidth=measure_bandwidth)
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.exists():
        builtin = resources.files(__name__) / f"{name_or_path}.toml"
        if not builtin.is_file():
            raise ProfileError(
                f"unknown device {str(name_or_path)!r}: not a built-in profile "
                f"({builtin_names()}) nor an existing .toml file"
            )
        text, origin = builtin.read_text(encoding="utf-8"), f"{name_or_path}.toml"
    else:
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{origin}: not valid TOML ({e})") from e
    return parse_profile(data, origin)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
