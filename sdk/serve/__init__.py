"""`infopt-pack serve`: an OpenAI-compatible HTTP server over one model, with a web chat page.
Needs the `serve` extra (FastAPI, uvicorn): `pip install 'infopt[serve]'`."""

from __future__ import annotations

from infopt.serve.app import create_app
from infopt.serve.server import run_server

__all__ = ["create_app", "run_server"]
