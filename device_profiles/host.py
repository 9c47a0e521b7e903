"""The `host` profile: read from the running machine (RAM, cores, CPU flags), bandwidth measured
on request (a numpy copy, counting bytes read + written, as shared benchmarks do)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from infopt.device_profiles import DeviceProfile, cpu_count

# Conservative stand-in when bandwidth is not measured: a dual-channel DDR4-3200 desktop.
DEFAULT_BANDWIDTH = 25e9
INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)
DECODE_EFFICIENCY = 0.44  # see intel-cpu.toml's source: llama.cpp's achieved bandwidth here
PREFILL_EFFICIENCY = 0.35


def meminfo() -> dict[str, float]:
    """MemTotal / MemAvailable in bytes (Linux), else physical pages from sysconf."""
    path = Path("/proc/meminfo")
    if path.exists():
        fields = {}
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                fields[key] = float(rest.split()[0]) * 1024
        if "MemTotal" in fields:
            return fields
    total = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return {"MemTotal": total, "MemAvailable": total * 0.7}


def cpu_info() -> tuple[str, tuple[str, ...], float]:
    """(model name, interesting ISA flags, clock in Hz) from /proc/cpuinfo when present."""
    name, flags, mhz = platform.processor() or platform.machine(), set(), 2500.0
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = value
            elif key in ("flags", "Features"):
                flags.update(value.split())
            elif key == "cpu MHz":
                mhz = float(value)
    return name, tuple(f for f in INTERESTING_FLAGS if f in flags), mhz * 1e6


def copy_bandwidth(size: int = 256 << 20, repeat: int = 5) -> float:
    """Best-of-N numpy copy: (bytes read + bytes written) / time."""
    import numpy as np

    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def host_runtimes() -> tuple[str, ...]:
    """The targets that run on a desktop CPU, in their records' order (`host_rank`): the same on
    every CPU vendor (docs/benchmarks.md measures the first decoding fastest on AMD and Intel
    machines alike)."""
    from infopt.runtimes.registry import targets

    ranked = sorted(
        (t for t in targets().values() if t.host_rank is not None), key=lambda t: t.host_rank or 0
    )
    return tuple(t.name for t in ranked)


def host_profile(measure_bandwidth: bool = False) -> DeviceProfile:
    mem = meminfo()
    name, flags, hz = cpu_info()
    cores = cpu_count()
    lanes = 16 if "avx512f" in flags else 8  # fp32 lanes per FMA (AVX-512 / AVX2 or NEON x2)
    fp32 = cores * hz * lanes * 2 * 2  # 2 FMA units x 2 FLOP per FMA
    peak = {"fp32": fp32}
    compute = ["fp32"]
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        peak["bf16"], compute = 2 * fp32, [*compute, "bf16"]
    if {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & set(flags):
        peak["int8"], compute = 4 * fp32, [*compute, "int8"]
    bandwidth = copy_bandwidth() if measure_bandwidth else DEFAULT_BANDWIDTH
    return DeviceProfile(
        name="host",
        description=f"this machine: {name}, {cores} cores, {mem['MemTotal'] / 1e9:.1f} GB RAM",
        kind="cpu",
        memory_bytes=mem["MemTotal"],
        usable_bytes=mem.get("MemAvailable", mem["MemTotal"]),
        bandwidth=bandwidth,
        peak_compute=peak,
        weight_precisions=("fp32", "fp16", "bf16", "int8", "int4"),
        compute_precisions=tuple(compute),
        runtimes=host_runtimes(),
        static_shapes=False,
        decode_efficiency=DECODE_EFFICIENCY,
        prefill_efficiency=PREFILL_EFFICIENCY,
        sources={
            "memory": "/proc/meminfo MemTotal",
            "usable_memory": "/proc/meminfo MemAvailable at planning time",
            "bandwidth": "measured: numpy copy, bytes read + written"
            if measure_bandwidth
            else "not measured: 25 GB/s assumed (pass --measure-bandwidth to measure)",
            "peak_compute": f"estimated: {cores} cores x {hz / 1e9:.2f} GHz x {lanes * 4} "
            "FP32 FLOP/cycle; bf16 2x, int8 4x where the ISA has them",
            "runtimes": "the desktop CPU targets in their records' order, the same on every CPU "
            "vendor (docs/benchmarks.md)",
            "efficiency": "decode 0.44 / prefill 0.35, as intel-cpu.toml (measured on this "
            "project's CI machine kind)",
        },
        cpu_flags=flags,
        cores=cores,
        path="host",
    )
