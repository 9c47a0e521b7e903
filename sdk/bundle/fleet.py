"""Fleet builds: one bundle per device, built as independent jobs on an executor (a local
process pool, or Ray tasks on a cluster), each written beside its final place and swapped in at
the end as a single build is, so a failed device leaves its folder as it was and the others
built."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from infopt.errors import InvalidArgumentError


def device_list(device: str) -> list[str]:
    """`a,b,c` -> the devices, in order, each once; an empty name is an error."""
    names = [d.strip() for d in device.split(",")]
    if any(not d for d in names):
        raise InvalidArgumentError(f"--device {device!r}: an empty device name in the list")
    return list(dict.fromkeys(names))


def folder_name(device: str) -> str:
    """The bundle folder of a device: its profile name, or a .toml file's stem."""
    stem = Path(device).stem if device.endswith(".toml") else device
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def build_job(job: dict[str, Any]) -> dict[str, Any]:
    """One device's bundle (a job of the executors: plain data in and out)."""
    from infopt.bundle.build import build

    options = dict(job["options"])
    return build(job["model"], job["out"], device=job["device"], **options)


def build_fleet(
    model: str | Path | None,
    out: str | Path,
    devices: list[str],
    *,
    executor: str = "local",
    address: str | None = None,
    workers: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """Build `model` for every device into OUT/<device>; returns each device's build summary,
    or its error after a retry (the executors retry a failed job once)."""
    from infopt.core.default_model import default_model_path
    from infopt.importers import load_spec
    from infopt.plan.executors import make_executor
    from infopt.plan.search import job_needs

    if not devices:
        raise InvalidArgumentError("no device to build for")
    if options.get("plan_file"):
        raise InvalidArgumentError("a plan file is for one device: give one --device with --plan")
    folders = [folder_name(d) for d in devices]
    if len(set(folders)) != len(folders):
        raise InvalidArgumentError(f"devices {devices} would share a bundle folder")
    if options.get("quantize") is not None:  # said once, before any executor starts
        from infopt.plan.planner import check_quantize

        check_quantize(options["quantize"])
    # absolute paths: a Ray task runs elsewhere (on another node, only a shared file system
    # makes them the same files)
    path = (Path(model) if model is not None else default_model_path()).resolve()
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        {"model": str(path), "out": str(root / f), "device": d, "options": options}
        for d, f in zip(devices, folders, strict=True)
    ]
    runner = make_executor(executor, workers=workers, address=address)
    built: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for outcome in runner.run(build_job, jobs, job_needs(load_spec(path), 1)):
        device = outcome.job["device"]
        if outcome.result is not None:
            built[device] = outcome.result
        else:
            failed[device] = outcome.error or "failed"
    return {
        "out": str(root),
        "executor": executor,
        "bundles": {d: str(root / f) for d, f in zip(devices, folders, strict=True) if d in built},
        "built": built,
        "failed": failed,
    }
