"""The plan search on the default model: the same front and choice on the local process pool
and on a local Ray instance (2 CPUs) started here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infopt.plan import search as search_module
from infopt.plan.search import search

ray = pytest.importorskip("ray")  # the `ray` extra is part of `dev`: CI has it


def test_the_default_models_search_agrees_on_the_pool_and_on_ray(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rtx4090-24gb: speed predicted (the same on both executors, not a timing); a float, INT8,
    # the file's own blocks and the pruned INT4 (each kind of work once: no second group size,
    # no GPTQ or low rank, whose calibration passes take most of a minute each here) and a
    # short text, to keep the test to about a minute
    every = search_module.candidates

    def quick(*args: Any, **kwargs: Any) -> Any:
        found, rejected = every(*args, **kwargs)
        skipped = ("int4 g32", "int4 g64")
        return [c for c in found if not c.compression.low_rank and c.name not in skipped], rejected

    monkeypatch.setattr(search_module, "candidates", quick)
    runs = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for executor in ("local", "ray"):
            monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / executor / "models"))
            runs[executor] = search(
                gguf_path,
                "rtx4090-24gb",
                context=1024,
                gptq=False,
                tokens=128,
                executor=executor,
                workers=2,
            )
    finally:
        ray.shutdown()
    local, on_ray = runs["local"], runs["ray"]
    assert len(local["results"]) >= 4 and not local["failures"] and not on_ray["failures"]
    assert local["front"] == on_ray["front"] and local["chosen"] == on_ray["chosen"]
    for a, b in zip(local["results"], on_ray["results"], strict=True):
        assert a["name"] == b["name"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    # the file's own Q4_1 blocks: the reference's values, so its perplexity
    stored = next(r for r in local["results"] if r["name"].endswith("as stored in the file"))
    assert stored["kl"] < 1e-9 and stored["perplexity"] == stored["reference_perplexity"]
    assert local["chosen"] == stored["name"]
