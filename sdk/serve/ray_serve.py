"""The OpenAI-compatible server as a Ray Serve application: N replicas, each loading the model
once and running the same FastAPI app as `infopt-pack serve`, behind Ray Serve's HTTP proxy,
which spreads requests over them. Needs the `ray` extra: `pip install 'infopt[ray]'`."""

from __future__ import annotations

from typing import Any

from infopt.errors import InvalidArgumentError, RuntimeNotAvailableError


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise RuntimeNotAvailableError(
            "serving on Ray needs Ray Serve: pip install 'infopt[ray]'"
        ) from None
    return serve


def application(
    load: dict[str, Any],
    app: dict[str, Any],
    *,
    replicas: int,
    cpus_per_replica: float = 1.0,
    batch_wait_s: float | None = None,
) -> Any:
    """The bound Ray Serve application: `replicas` copies of the server, each built from
    `infopt.load(**load)` (with `batch_wait_s` for its batching) and `create_app(model, **app)`
    when its replica starts."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(f"replicas={replicas!r}: expected an integer >= 1")
    serve = _serve()

    @serve.deployment(
        name="infopt",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        # the app queues and refuses (429) on its own; let the proxy hand requests over
        max_ongoing_requests=1000,
    )
    @serve.ingress()
    class InfoptServer:
        def __init__(self, load: dict[str, Any], app: dict[str, Any]) -> None:
            import infopt
            from infopt.serve.app import create_app

            self.model = infopt.load(**load)
            if batch_wait_s is not None:
                self.model.engine.batch_wait_s = batch_wait_s
            self.asgi = create_app(self.model, **app)

        def __serve_build_asgi_app__(self) -> Any:
            return self.asgi

    deployment: Any = InfoptServer
    return deployment.bind(load, app)


def run_replicas(
    application_: Any, *, host: str, port: int, address: str | None, blocking: bool = True
) -> None:
    """Start (or join) Ray, put the proxy on host:port and deploy; with `blocking`, serve until
    Ctrl-C, then take the deployment down."""
    import ray

    serve = _serve()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        serve.run(application_, name="infopt", route_prefix="/")
        return
    try:
        serve.run(application_, name="infopt", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
