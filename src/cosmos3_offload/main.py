"""The `cosmos3-offload` console script: the CLI (app/cli.py), with `serve` handed the HTTP server.

The CLI parses and checks every command's flags, `serve`'s too; the server lives a layer above it
(serve/), so this entry point passes it in. Nothing heavy is imported here: a damaged checkpoint is
refused before torch loads (app/launch.py), and FastAPI loads only for `serve`.
"""

from __future__ import annotations

from .app.launch import main as launch_main


def main(argv: list[str] | None = None) -> int:
    return launch_main(argv, serve=_serve)


def _serve(loaded, settings) -> int:
    from .serve.server import serve  # FastAPI, uvicorn: only for `serve`

    return serve(loaded, settings)
