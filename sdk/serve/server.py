"""Running the application: uvicorn on a socket the caller has bound, with a shutdown that
lets running requests finish for a while and then closes them cleanly."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

GRACE_S = 5.0  # how long a shutdown lets running requests finish before closing them
BACKSTOP_S = 5.0  # then how long uvicorn waits before cancelling whatever is left


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown gives running requests GRACE_S seconds to finish and
    then closes them, each client told why, rather than cancelling them mid-token."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(GRACE_S + BACKSTOP_S),
        )
        super().__init__(config)
        self.stop_requests = app.state.stop_requests

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        closing = asyncio.get_running_loop().call_later(GRACE_S, self.stop_requests)
        try:
            await super().shutdown(sockets)
        finally:
            closing.cancel()


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on the listening `sock` until Ctrl-C or SIGTERM (uvicorn re-raises the
    signal once it has shut down)."""
    Server(app).run(sockets=[sock])
