"""Plan search, fleet builds and server replicas on the local process pool and on a local Ray
instance started here (2 CPUs, loopback only)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import infopt
from infopt.bundle import verify_bundle
from infopt.cli import main
from infopt.device_profiles import load_profile
from infopt.errors import InvalidArgumentError
from infopt.importers import load_spec
from infopt.plan import search as search_module
from infopt.plan.executors import LocalExecutor, RayExecutor
from infopt.plan.search import candidates, choose, pareto, search

ray = pytest.importorskip("ray")  # the `ray` extra is part of `dev`: CI has it


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # this module's job functions travel by value: Ray's workers need not import the tests
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache" / "models"))
    return tmp_path / "cache" / "search"


def die_once(job: dict[str, Any]) -> dict[str, Any]:
    """A job whose first attempt kills its worker process."""
    marker = Path(job["marker"])
    if not marker.exists():
        marker.write_text("died")
        os._exit(3)
    return {"value": job["value"], "pid": os.getpid()}


def sleeps(job: dict[str, Any]) -> dict[str, Any]:
    import time

    time.sleep(job["seconds"])
    return {"slept": job["seconds"]}


def always_fails(job: dict[str, Any]) -> dict[str, Any]:
    with Path(job["log"]).open("a") as log:
        log.write("attempt\n")
    raise ValueError(f"candidate {job['value']} cannot be built")


def test_at_least_six_candidates_fit_and_the_rest_say_why(tiny_folder: Path) -> None:
    spec = load_spec(tiny_folder)
    found, rejected = candidates(spec, load_profile("intel-cpu"), context=256)
    names = [c.name for c in found]
    assert len(found) >= 6 and len(set(names)) == len(names)
    assert {"fp32", "int8", "int4 g32", "int4 g32 GPTQ", "int4 g64"} <= set(names)
    # TINY's MLP is 128 wide: pruned by 25 % it is 96, which groups of 64 do not divide
    assert rejected == [
        {"option": "int4 g64 + MLP pruned 25%", "reason": "a group size does not divide"}
    ]
    # OpenVINO (intel-cpu's runtime) keeps the plan's KV precision: int8 caches are candidates
    assert {"int8 + kv int8", "int4 g32 + kv int8"} <= set(names)
    assert "int4 g64 + low-rank 80%" in names
    # ONNX Runtime (the host's first runtime) keeps its own float32 cache: they are not, and say
    # why
    _, on_host = candidates(spec, load_profile("host"), context=256)
    assert {
        "option": "int8 + kv int8",
        "reason": "onnxruntime holds its KV cache in fp32, not int8",
    } in on_host


def test_the_front_and_the_choice() -> None:
    rows = [
        {"name": "big", "memory_bytes": 100, "perplexity": 10.0, "tok_s": 10.0, "ppl_delta": 0.0},
        {"name": "small", "memory_bytes": 50, "perplexity": 10.4, "tok_s": 20.0, "ppl_delta": 0.04},
        {"name": "worse", "memory_bytes": 60, "perplexity": 10.6, "tok_s": 15.0, "ppl_delta": 0.06},
        {"name": "tiny", "memory_bytes": 30, "perplexity": 12.0, "tok_s": 25.0, "ppl_delta": 0.2},
    ]
    assert [r["name"] for r in pareto(rows)] == ["tiny", "small", "big"]
    assert choose(rows, 0.05, None)["name"] == "small"  # type: ignore[index]
    assert choose(rows, None, 45.0)["name"] == "tiny"  # type: ignore[index]
    assert choose(rows, 0.01, 50.0) is None  # big is within 1 % but misses the latency


def test_search_on_the_pool_and_on_ray_agree_and_a_rerun_computes_nothing(
    tiny_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_ray: Any,
) -> None:
    runs = {}
    for executor in ("local", "ray"):
        monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / executor / "models"))
        runs[executor] = search(
            tiny_folder,
            "intel-cpu",  # predicted speed: the same on both, not a timing
            context=256,
            executor=executor,
            plan_out=tmp_path / f"{executor}.json",
        )
    local, on_ray = runs["local"], runs["ray"]
    assert len(local["results"]) >= 6 and not local["failures"]
    by_name = {r["name"]: r for r in local["results"]}
    plain, int8_cache = by_name["int8"], by_name["int8 + kv int8"]  # the latter on OpenVINO
    assert int8_cache["memory_bytes"] < plain["memory_bytes"] and int8_cache["kl"] != plain["kl"]
    assert local["front"] == on_ray["front"] and local["chosen"] == on_ray["chosen"]
    for a, b in zip(local["results"], on_ray["results"], strict=True):
        assert a["name"] == b["name"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    assert not any(r["cached"] for r in local["results"] + on_ray["results"])
    plan = json.loads((tmp_path / "local.json").read_text())
    assert plan["reasons"][0].startswith("search: the smallest of the measured candidates")
    assert plan["compression"]["name"] == local["chosen"]
    # the same search again: every result from the cache, no executor asked for
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "local" / "models"))

    def no_executor(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached search ran a job")

    monkeypatch.setattr(search_module, "make_executor", no_executor)
    again = search(tiny_folder, "intel-cpu", context=256)
    assert all(r["cached"] for r in again["results"])
    assert again["chosen"] == local["chosen"] and again["front"] == local["front"]


def test_an_interrupted_search_resumes_from_what_it_finished(
    tiny_folder: Path, cache: Path
) -> None:
    heard: list[dict[str, Any]] = []

    def stop_after_two(row: dict[str, Any]) -> None:
        heard.append(row)
        if len(heard) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(tiny_folder, "intel-cpu", context=256, on_result=stop_after_two)
    assert len(list(cache.glob("*.json"))) == 2  # kept as they came
    done = search(tiny_folder, "intel-cpu", context=256)
    assert sum(r["cached"] for r in done["results"]) == 2
    assert len(list(cache.glob("*.json"))) == len(done["results"])


def test_the_plan_a_search_chose_builds(tiny_gguf: Path, cache: Path, tmp_path: Path) -> None:
    found = search(tiny_gguf, "host", context=128, plan_out=tmp_path / "plan.json")
    assert all(r["speed"] == "measured" for r in found["results"])  # on this machine
    out = tmp_path / "bundle"
    infopt.build(tiny_gguf, out, plan_file=tmp_path / "plan.json")
    manifest = verify_bundle(out)
    chosen = next(r for r in found["results"] if r["name"] == found["chosen"])
    assert manifest["plan"]["compression"]["weights"] == chosen["candidate"]["weights"]
    assert manifest["plan"]["method"] == chosen["candidate"]["method"]


def test_the_command_prints_the_front_and_writes_the_plan(
    tiny_folder: Path, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.json"
    args = ["search", str(tiny_folder), "--device", "intel-cpu", "--context", "256"]
    r = CliRunner().invoke(main, [*args, "-o", str(out), "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    assert "chosen:" in r.output and f"--plan {out}" in r.output and out.exists()
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    data = json.loads(r.stdout)
    assert data["chosen"] and all(row["cached"] for row in data["results"])
    for bad, said in (
        (["--max-ppl-delta", "-1"], "max_ppl_delta=-1"),
        (["--threads", "0"], "'--threads': 0 is not in the range x>=1"),
        (["--tokens", "10"], "'--tokens': 10 is not in the range x>=64"),
        (["--context", "100000"], "exceeds the model's trained context"),
    ):
        r = CliRunner().invoke(main, [*args, *bad])
        assert r.exit_code != 0 and said in r.output, (bad, r.output)
    for kwargs, said in (({"threads": 0}, "threads=0"), ({"tokens": 10}, "tokens=10")):
        with pytest.raises(InvalidArgumentError, match=said):  # the API's own checks
            search(tiny_folder, "intel-cpu", **kwargs)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_killed_worker_is_retried_and_a_failing_job_reported_once_retried(
    kind: str, tmp_path: Path, local_ray: Any
) -> None:
    runner = LocalExecutor(2) if kind == "local" else RayExecutor()
    jobs = [{"marker": str(tmp_path / f"m{i}"), "value": i} for i in range(3)]
    outcomes = list(runner.run(die_once, jobs))
    assert sorted(o.result["value"] for o in outcomes if o.result) == [0, 1, 2]
    assert all((tmp_path / f"m{i}").exists() for i in range(3))  # each one died once
    log = tmp_path / "attempts.log"
    failed = list(runner.run(always_fails, [{"log": str(log), "value": 7}]))
    assert failed[0].result is None and "candidate 7 cannot be built" in (failed[0].error or "")
    assert log.read_text().count("attempt") == 2  # the first try and one retry


def test_a_fleet_build_makes_one_bundle_per_device(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    r = CliRunner().invoke(
        main, ["build", str(tiny_gguf), "--device", "host,intel-cpu", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert sorted(summary["bundles"]) == ["host", "intel-cpu"] and not summary["failed"]
    for device in ("host", "intel-cpu"):
        manifest = verify_bundle(out / device)
        assert manifest["plan"]["device"] == load_profile(device).name
    r = CliRunner().invoke(main, ["build", str(tiny_gguf), "--device", "host,", "-o", str(out)])
    assert r.exit_code != 0 and "empty device name" in r.output
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    args = ["build", str(tiny_gguf), "--device", "host,intel-cpu", "--plan", str(plan)]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "other")])
    assert r.exit_code != 0 and "a plan file is for one device" in r.output
    args = ["build", str(tiny_gguf), "--device", "host,intel-cpu", "--quantize", "int3"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "q3")])  # before any job runs
    assert r.exit_code == 1 and "'int3'" in r.output and not (tmp_path / "q3").exists()


def test_two_serve_replicas_answer_openais_client(tiny_gguf: Path, local_ray: Any) -> None:
    from openai import OpenAI

    from infopt.serve.ray_serve import application, run_replicas

    app = application(
        {"model": str(tiny_gguf), "runtime": "pytorch", "max_context": 128},
        {"model_id": "tiny", "api_key": "k", "max_queue": 8},
        replicas=2,
        cpus_per_replica=0.5,
    )
    run_replicas(app, host="127.0.0.1", port=18765, address=None, blocking=False)
    client = OpenAI(base_url="http://127.0.0.1:18765/v1", api_key="k")
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answer.choices[0].message.content
    pids = {httpx.get("http://127.0.0.1:18765/health").json()["pid"] for _ in range(30)}
    assert len(pids) == 2  # both replicas answered
    with pytest.raises(Exception, match="401|api key|Unauthorized|invalid"):
        OpenAI(base_url="http://127.0.0.1:18765/v1", api_key="wrong").models.list()


def test_a_files_own_blocks_are_a_candidate_that_loses_nothing(
    tiny_gguf_q41: Path, cache: Path
) -> None:
    """A Q4_1 GGUF: its blocks kept as they are score the file's own values (the reference);
    INT4 rounded again from them does not."""
    found = search(tiny_gguf_q41, "intel-cpu", context=256)
    stored = next(r for r in found["results"] if r["name"].endswith("as stored in the file"))
    assert stored["candidate"]["weights"]["mlp"] == "int4m-g32"
    assert stored["kl"] < 1e-6 and stored["top1"] == 1.0
    assert stored["perplexity"] == pytest.approx(stored["reference_perplexity"], rel=1e-5)
    again = next(r for r in found["results"] if r["name"] == "int4 g32")
    assert again["kl"] > 100 * max(stored["kl"], 1e-9)


def test_a_search_stopped_early_stops_its_workers() -> None:
    """The consumer leaves after the first result: the running job is stopped and the queued
    ones never start (closing returns long before they would have finished)."""
    import time

    runs = LocalExecutor(1).run(sleeps, [{"seconds": 0.1}, {"seconds": 60}, {"seconds": 60}])
    first = next(runs)
    assert first.result == {"slept": 0.1}
    started = time.perf_counter()
    runs.close()
    assert time.perf_counter() - started < 20


def test_the_scaling_estimate_reads_a_search_and_scales_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from infopt.tools import search_scaling

    configs = Path(__file__).parents[1] / "data" / "configs"
    rtn = {"candidate": {"method": "rtn"}, "seconds": 10.0}
    gptq = {"candidate": {"method": "gptq"}, "seconds": 40.0}
    run = {"model": str(configs / "smollm2-135m.json"), "threads": 2,
           "results": [rtn, rtn, gptq]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(run))
    args = [str(tmp_path / "s.json"), str(configs / "llama-2-70b.json"), "--markdown"]
    assert search_scaling.main([*args, "--node-memory-gb", "2048", "--nodes", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "2 RTN + 1 GPTQ candidates" in out and "| llama 80L/8192 |" in out
    # 70B: GPTQ 40 s x (params ratio) x (hidden ratio) / (8 / 2 threads), in hours
    row = next(line for line in out.splitlines() if line.startswith("| llama 80L/8192"))
    assert row.count(" h |") >= 2
    assert search_scaling.main([*args, "--node-memory-gb", "512"]) == 0
    assert "does not fit a node" in capsys.readouterr().out
