"""`cosmos3-offload`: parse flags, build a request, call the library, print the report.

- `flags`: the flag tables (the request's generated from its declaration, request/spec.py);
- `translate`: flags into the request and the model's options, each checked before anything loads;
- `commands`: plan, generate (one request, sample files, several GPUs) and serve;
- `shell`: `main`, which ends every run in one line and the right exit status.
"""

from .commands import serve_plan
from .flags import build_parser
from .shell import main

__all__ = ["build_parser", "main", "serve_plan"]
