"""`infopt-pack serve`: an OpenAI-compatible HTTP server and web chat page over one model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import click

from infopt.cli.chat import no_room_for_chat
from infopt.cli.output import Bars, friendly_errors
from infopt.core.defaults import DEFAULT_MAX_CONTEXT
from infopt.runtimes.registry import reference


@click.command()
@click.argument("model", required=False)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 serves other machines too (then set --api-key).",
)
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port; 0 picks a free one (the URL printed says which).",
)
@click.option(
    "--runtime",
    help="For a bundle: which of its artifacts to run (default: the manifest's). For a model "
    "file: the runtime to run it on (default: the fastest installed here; "
    f"{reference().name} reads it as float32 with nothing converted).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads (default: the runtime's choice)."
)
@click.option(
    "--context",
    "--max-context",
    "max_context",
    type=click.IntRange(min=1),
    help=f"KV-cache size in tokens, per slot (default: min(model, {DEFAULT_MAX_CONTEXT}); a "
    "bundle's: the context it was built for).",
)
@click.option(
    "--slots",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Requests generated at once, batched together; each holds its own KV cache.",
)
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(0),
    help="Requests that may wait for a free slot; past slots + max-queue the server answers "
    "429 at once.",
)
@click.option(
    "--batch-wait-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="Dynamic batching: an idle server given fewer requests than slots waits this long for "
    "others arriving together, so they decode as one batch from their first token (a lone "
    "request pays the wait).",
)
@click.option(
    "--api-key",
    envvar="INFOPT_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 requests (or set INFOPT_API_KEY).",
)
@click.option(
    "--model-id",
    help="The model's name in the API (default: its file name without .gguf, or folder name).",
)
@click.option(
    "--ray-replicas",
    type=click.IntRange(min=1),
    help="Serve N replicas on Ray Serve behind its HTTP proxy (each loads the model once; "
    "pip install 'infopt[ray]').",
)
@click.option(
    "--address",
    help="With --ray-replicas: the Ray cluster to join (`auto` or HOST:PORT); default a local one.",
)
@friendly_errors
def serve(
    model: str | None,
    host: str,
    port: int,
    runtime: str | None,
    threads: int | None,
    max_context: int | None,
    slots: int,
    max_queue: int,
    batch_wait_ms: float,
    api_key: str | None,
    model_id: str | None,
    ray_replicas: int | None,
    address: str | None,
) -> None:
    """Serve MODEL (a bundle, a GGUF file or a Hugging Face folder; default: the default model)
    over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions (streamed with
    "stream": true), GET /v1/models and /health, and a chat page at /.

    \b
    Examples:
      infopt-pack serve                      # then open http://127.0.0.1:8080/
      infopt-pack serve model.gguf --port 9000 --slots 8 --api-key s3cret
    \b
    From Python, with OpenAI's client:
      OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="s3cret")
    """
    try:
        from infopt.serve import create_app, run_server
    except ImportError as e:
        raise click.ClickException(
            f"serving needs FastAPI and uvicorn ({e}): pip install 'infopt[serve]'"
        ) from e
    import infopt

    if api_key == "":
        raise click.BadParameter("an empty key would let anyone in", param_hint="--api-key")
    if ray_replicas is not None:
        from infopt.serve.ray_serve import application, run_replicas

        # replicas run in other processes (or nodes): an absolute path, and threads shared out
        per_replica = threads or max(1, (os.cpu_count() or 1) // ray_replicas)
        load = dict(
            model=str(Path(model).resolve()) if model else None,
            runtime=runtime,
            threads=per_replica,
            max_context=max_context,
            slots=slots,
        )
        name = model_id or Path(model or "default").name.removesuffix(".gguf")
        options = dict(model_id=name, api_key=api_key, max_queue=max_queue)
        deployment = application(
            load,
            options,
            replicas=ray_replicas,
            cpus_per_replica=per_replica,
            batch_wait_s=batch_wait_ms / 1000,
        )
        click.echo(
            f"Serving {name} on Ray Serve, {ray_replicas} replicas, at http://{host}:{port}/",
            err=True,
        )
        run_replicas(deployment, host=host, port=port, address=address)
        return
    sock = _listen(host, port)  # before loading: a port in use fails in a second, not a minute
    bars = Bars()  # a model file's first conversion for its runtime
    try:
        m = infopt.load(
            model,
            runtime=runtime,
            threads=threads,
            max_context=max_context,
            slots=slots,
            progress=bars,
        )
    finally:
        bars.close()
    m.engine.batch_wait_s = batch_wait_ms / 1000
    name = model_id or Path(m.source).name.removesuffix(".gguf")
    app = create_app(m, model_id=name, api_key=api_key, max_queue=max_queue)
    bound, actual = sock.getsockname()[:2]
    url = f"http://{f'[{bound}]' if ':' in bound else bound}:{actual}"
    # the slots the runtime grants: one, on runtimes whose graph holds a single KV state
    granted = m.status()["slots"]
    plural = "slot" if granted == 1 else "slots"
    click.echo(f"Serving {name} ({m.runtime.name}, {granted} {plural}) at {url}/  API: {url}/v1")
    if granted < slots:
        click.echo(
            f"note: {m.runtime.name} takes {granted} request at a time, not the {slots} of "
            "--slots: the others wait in the queue (docs/serve.md lists the runtimes that batch "
            "requests)",
            err=True,
        )
    why = no_room_for_chat(m)
    if why:  # plain completions may still fit: said, not refused
        click.echo(
            f"note: the context of {m.runtime.max_context} tokens (--context) {why}; chat "
            "requests will be refused with 400, only short /v1/completions prompts answered",
            err=True,
        )
    click.echo("Ctrl-C stops it.", err=True)
    # uvicorn shuts down cleanly on Ctrl-C or SIGTERM, then re-raises the signal to the handler
    # it found: SIGTERM's (systemd, `docker stop`) is made Ctrl-C's, so either ends here, with
    # "stopped" and status 0, not in a kill by the default handler. A process started with
    # SIGINT ignored (a background job of a shell) gets nothing re-raised for it: it returns.
    previous = signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_server(app, sock)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("stopped", err=True)


def _as_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that the URL printed is answered from the moment it is printed
    (connections wait in the backlog until the server runs)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {e.strerror or e}"
            + (" (another server has it: pick a --port)" if "in use" in str(e) else "")
        ) from e
    return sock
